"""Tiny SD-shaped pipelines with random weights, built in the tests (no downloads).

They keep Stable Diffusion's component classes and block layout (cross-attention
down, mid and up blocks) at toy sizes, so encoder propagation runs through the
same diffusers code paths as on SD1.5.
"""

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
)


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with no merges (every character is a token)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=32)


def tiny_text_encoder(seed=0, hidden=32, projection=False):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=520, max_position_embeddings=32, projection_dim=hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_unet(seed=0, in_channels=4, cross_attention_dim=32, **overrides):
    torch.manual_seed(seed)
    config = dict(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=8, cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 16), norm_num_groups=8, in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    ).eval()


def tiny_sd(cls=StableDiffusionPipeline, in_channels=4, **unet_overrides):
    pipe = cls(
        unet=tiny_unet(in_channels=in_channels, **unet_overrides), vae=tiny_vae(),
        text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(),
        scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_img2img():
    return tiny_sd(StableDiffusionImg2ImgPipeline)


def tiny_inpaint():
    return tiny_sd(StableDiffusionInpaintPipeline, in_channels=9)


def tiny_controlnet_sd():
    pipe = tiny_sd()
    return StableDiffusionControlNetPipeline(
        **{k: v for k, v in pipe.components.items() if k != "image_encoder"}, controlnet=tiny_controlnet(pipe.unet),
        requires_safety_checker=False,
    )


def tiny_controlnet(unet):
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    # A zero-initialised ControlNet adds nothing; give its output convs weights so it matters.
    for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        torch.nn.init.normal_(module.weight, std=0.2)
    return controlnet


def tiny_sdxl():
    unet = tiny_unet(
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(1, 2, 1),
        use_linear_projection=True,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=tiny_vae(), text_encoder=tiny_text_encoder(), text_encoder_2=tiny_text_encoder(1, projection=True),
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(),
        scheduler=DDIMScheduler(**SD_SCHEDULER), force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_img2img():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(**tiny_sdxl().components)


def tiny_sdxl_inpaint():
    from diffusers import StableDiffusionXLInpaintPipeline

    return StableDiffusionXLInpaintPipeline(**tiny_sdxl().components)


def tiny_controlnet_sdxl():
    from diffusers import StableDiffusionXLControlNetPipeline

    pipe = tiny_sdxl()
    components = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    return StableDiffusionXLControlNetPipeline(**components, controlnet=tiny_controlnet(pipe.unet))
