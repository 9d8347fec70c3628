"""Tiny transformer pipelines with random weights, built in the tests (no downloads).

diffusers' own classes (DiT, PixArt-alpha and -sigma, SD3, Flux) at toy sizes: four blocks each (Flux:
two dual-stream and two single-stream), so every level of ``transformer_split`` has a span to replay.
"""

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
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


def tiny_qwen_image():
    """QwenImagePipeline: dual-stream blocks on packed latents, true CFG by a call per branch with the guided
    prediction renormalised. No text encoder (a Qwen2.5-VL): the calls pass prompt embeddings."""
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        **HEADS, patch_size=2, in_channels=16, out_channels=4, num_layers=4, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    return _quiet(QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                                    transformer=transformer))


def tiny_wan():
    """WanPipeline (Wan 2.1): a video transformer of `blocks` on (batch, channels, frames, height, width) latents,
    classifier-free guidance by a call per branch."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        **HEADS, patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=4,
        rope_max_seq_len=32,
    ).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                          relative_attention_num_buckets=8)).eval()
    return _quiet(WanPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=encoder, vae=vae, transformer=transformer,
                              scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)))


def _embeddings(seed: int, tokens: int = 5, width: int = 16):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, width, generator=generator), torch.ones(1, tokens, dtype=torch.long)


_QWEN_PROMPT, _QWEN_MASK = _embeddings(1)
_QWEN_NEGATIVE, _QWEN_NEGATIVE_MASK = _embeddings(2)

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
    "qwen_image": (tiny_qwen_image, dict(prompt_embeds=_QWEN_PROMPT, prompt_embeds_mask=_QWEN_MASK, negative_prompt_embeds=_QWEN_NEGATIVE,
                                         negative_prompt_embeds_mask=_QWEN_NEGATIVE_MASK, true_cfg_scale=4.0, height=16, width=16,
                                         output_type="latent")),
    "wan": (tiny_wan, dict(prompt="a red square", negative_prompt="", guidance_scale=5.0, height=32, width=32, num_frames=5,
                           max_sequence_length=16, output_type="latent")),
}
#: the pipelines that call the transformer once per guidance branch, each in its own cache_context
CALLS_PER_BRANCH = ("flux", "qwen_image", "wan")
#: each pipeline's keyword arguments of an unguided call
UNGUIDED = {"flux": dict(negative_prompt=None), "qwen_image": dict(negative_prompt_embeds=None, negative_prompt_embeds_mask=None)}
