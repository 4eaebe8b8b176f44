"""Assembling a LLaVA-architecture model from a causal language model and a fresh vision tower.

`assemble_llava` builds the embedded vision-language miniature (the embedded SmolLM2 as the
language model, a small randomly initialised CLIP vision tower for 64 x 64 images) and the tiny
models of the tests: the language model's weights are copied unchanged, an ``<image>`` token is
added to its tokenizer (the embedding matrix grows by one row), the vision tower and the
two-layer projector are initialised at random from ``seed``. The directory it writes loads with
`milora.models.load_base_model` like any LLaVA checkpoint: weights (safetensors), config,
processor (the PIL CLIP image processor, so no torchvision) and a ChatML chat template whose
turns may hold image entries. Settings follow LLaVA-1.5: features of the second-to-last vision
layer, CLS token dropped, a GELU projector.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from milora.io import staged_directory
from milora.models import load_pretrained_model, load_tokenizer

IMAGE_TOKEN = "<image>"
CHATML_WITH_IMAGES = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML (SmolLM2's format) with image entries rendered as the ``<image>`` placeholder."""


def assemble_llava(text_model: str | os.PathLike | None, output_dir: str | os.PathLike, *, image_size: int = 64,
                   patch_size: int = 8, vision_hidden: int = 192, vision_layers: int = 2, vision_heads: int = 4,
                   seed: int = 0, chat_template: str = CHATML_WITH_IMAGES) -> Path:
    """Write a LLaVA model directory built from ``text_model`` (a causal LM directory; None = the
    embedded SmolLM2) and a random CLIP vision tower of ``vision_layers`` layers seeing
    ``image_size`` x ``image_size`` images in ``patch_size`` patches: (image_size / patch_size)^2
    image tokens per image. Deterministic given ``seed``; returns ``output_dir``."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}.")
    language_model = load_pretrained_model(text_model)
    tokenizer = load_tokenizer(text_model)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    torch.manual_seed(seed)
    language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden,
                              intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
                              num_attention_heads=vision_heads)
    config = LlavaConfig(vision_config=vision, text_config=language_model.config,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    model.generation_config = language_model.generation_config
    square = {"height": image_size, "width": image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size=square, crop_size=square, do_center_crop=False),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat_template,
    )
    with staged_directory(Path(output_dir)) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
    return Path(output_dir)
