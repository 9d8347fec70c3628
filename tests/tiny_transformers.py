"""Tiny transformer pipelines with random weights, built in the tests (no downloads).

diffusers' own classes (DiT, PixArt-alpha and -sigma, SD3, Flux) at toy sizes: four blocks each (Flux:
two dual-stream and two single-stream), so every level of ``transformer_split`` has a span to replay.
"""

import torch
from diffusers import (
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tiny_pipelines import SD_SCHEDULER, tiny_t5_encoder, tiny_t5_tokenizer, tiny_text_encoder, tiny_tokenizer, tiny_vae

HEADS = dict(num_attention_heads=2, attention_head_dim=8)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_dit():
    """DiTPipeline: class-conditional, learned sigma (8 output channels), rows [conditional, null class]."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        **HEADS, in_channels=4, out_channels=8, num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
    ).eval()
    return _quiet(DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler(**SD_SCHEDULER)))


def tiny_pixart(cls=PixArtAlphaPipeline):
    """PixArtAlphaPipeline or PixArtSigmaPipeline: a T5 prompt, adaLN-single blocks with cross-attention."""
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        **HEADS, in_channels=4, out_channels=8, num_layers=4, sample_size=8, patch_size=2, caption_channels=32,
        cross_attention_dim=16, norm_type="ada_norm_single", use_additional_conditions=False,
    ).eval()
    return _quiet(cls(tokenizer=tiny_t5_tokenizer(), text_encoder=tiny_t5_encoder(), vae=tiny_vae(), transformer=transformer,
                      scheduler=DDIMScheduler(**SD_SCHEDULER)))


def tiny_pixart_sigma():
    return tiny_pixart(PixArtSigmaPipeline)


def tiny_sd3():
    """StableDiffusion3Pipeline: joint (MMDiT) blocks, two CLIP encoders, no T5 (its embeddings are zeros)."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        **HEADS, sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, joint_attention_dim=64,
        caption_projection_dim=16, pooled_projection_dim=64,
    ).eval()
    return _quiet(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
        text_encoder=tiny_text_encoder(projection=True), tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_text_encoder(seed=1, projection=True), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    ))


def tiny_flux():
    """FluxPipeline: two dual-stream and two single-stream blocks on packed (batch, tokens, 16) latents."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        **HEADS, patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=(2, 2, 4),
    ).eval()
    return _quiet(FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_t5_encoder(), tokenizer_2=tiny_t5_tokenizer(), transformer=transformer,
    ))


#: name -> (builder, the keyword arguments of a guided call returning latents)
PIPELINES = {
    "dit": (tiny_dit, dict(class_labels=[3], guidance_scale=4.0, output_type="pt")),
    "pixart_alpha": (tiny_pixart, dict(prompt="a red square", guidance_scale=4.5, use_resolution_binning=False,
                                       max_sequence_length=16, output_type="latent")),
    "pixart_sigma": (tiny_pixart_sigma, dict(prompt="a red square", guidance_scale=4.5, use_resolution_binning=False,
                                             max_sequence_length=16, output_type="latent")),
    "sd3": (tiny_sd3, dict(prompt="a red square", guidance_scale=5.0, height=16, width=16, output_type="latent")),
    "flux": (tiny_flux, dict(prompt="a red square", negative_prompt="", true_cfg_scale=4.0, height=16, width=16,
                             max_sequence_length=8, output_type="latent")),
}
