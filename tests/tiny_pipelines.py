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


def _unzero(module, seed=2, std=0.1):
    """Gives random weights to the zero-initialised layers (temporal convs, motion modules' outputs),
    which would otherwise add nothing to the random UNet."""
    torch.manual_seed(seed)
    for parameter in module.parameters():
        if parameter.dim() > 1 and not parameter.any():
            torch.nn.init.normal_(parameter, std=std)
    return module


def tiny_unet3d(seed=0):
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    )
    return _unzero(unet).eval()


def tiny_text_to_video():
    """TextToVideoSDPipeline (ModelScope layout: UNet3DConditionModel with transformer_in)."""
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(), unet=tiny_unet3d(),
        scheduler=DDIMScheduler(**SD_SCHEDULER),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_animatediff():
    """AnimateDiffPipeline: the tiny SD UNet with a tiny MotionAdapter (a UNetMotionModel once built)."""
    from diffusers import AnimateDiffPipeline, MotionAdapter

    torch.manual_seed(1)
    adapter = _unzero(MotionAdapter(
        block_out_channels=(16, 32, 32), motion_layers_per_block=1, motion_norm_num_groups=8,
        motion_num_attention_heads=2, motion_max_seq_length=16,
    )).eval()
    scheduler = DDIMScheduler(**{**SD_SCHEDULER, "beta_schedule": "linear"})
    pipe = AnimateDiffPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(), unet=tiny_unet(),
        motion_adapter=adapter, scheduler=scheduler, feature_extractor=None, image_encoder=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_t5_tokenizer():
    """A T5 tokenizer built here: a unigram model over single characters (no sentencepiece file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\u2581"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0, model_max_length=77)


def tiny_t5_encoder(seed=0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()


IF_UNET = dict(
    sample_size=16, block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32, encoder_hid_dim=32,
    attention_head_dim=8, down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift", act_fn="gelu",
)
IF_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02, thresholding=True,
    dynamic_thresholding_ratio=0.95, sample_max_value=1.0, prediction_type="epsilon", variance_type="learned_range",
)


def tiny_if():
    """IFPipeline (DeepFloyd IF stage I): pixel-space UNet with a T5 text encoder projected by
    encoder_hid_proj, a text addition embedding and learned variance (6 output channels)."""
    from diffusers import DDPMScheduler, IFPipeline
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**IF_UNET, layers_per_block=1, in_channels=3, out_channels=6).eval()
    unet.set_attn_processor(AttnAddedKVProcessor())
    pipe = IFPipeline(
        tokenizer=tiny_t5_tokenizer(), text_encoder=tiny_t5_encoder(), unet=unet, scheduler=DDPMScheduler(**IF_SCHEDULER),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_if_superresolution():
    """IFSuperResolutionPipeline (stage II): the low-resolution image as 3 more input channels and its
    noise level as class_labels."""
    from diffusers import DDPMScheduler, IFSuperResolutionPipeline
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        **IF_UNET, layers_per_block=(1, 2), in_channels=6, out_channels=6, class_embed_type="timestep",
        mid_block_scale_factor=1.414, time_embedding_act_fn="gelu", time_embedding_dim=32,
    ).eval()
    unet.set_attn_processor(AttnAddedKVProcessor())
    pipe = IFSuperResolutionPipeline(
        tokenizer=tiny_t5_tokenizer(), text_encoder=tiny_t5_encoder(), unet=unet, scheduler=DDPMScheduler(**IF_SCHEDULER),
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
