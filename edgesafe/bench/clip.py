"""A local CLIP model (``CLIPModel`` + tokenizer folder, loaded offline) for zero-shot concept detection,
CLIP score and Frechet distance on CLIP image features. Nothing is downloaded: the recipe names a folder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import ModelLoadError, first_line

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation
STD = (0.26862954, 0.26130258, 0.27577711)


class LocalClip:
    """Image and text embeddings from a CLIP folder; images in [0, 1] (N,3,H,W)."""

    def __init__(self, folder: str | Path):
        from transformers import CLIPModel, CLIPTokenizer

        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: no CLIP model folder (config.json missing)")
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, SafetensorError, RuntimeError, KeyError) as exc:
            raise ModelLoadError(f"{path}: cannot load CLIP ({first_line(exc)})") from None
        self.size = self.model.config.vision_config.image_size

    @torch.no_grad()
    def images(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Unit-norm image embeddings."""
        out = []
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        for chunk in images.split(batch_size):
            x = torch.nn.functional.interpolate(chunk.float(), size=(self.size, self.size), mode="bicubic",
                                                align_corners=False).clamp(0, 1)
            out.append(self.model.get_image_features(pixel_values=(x - mean) / std))
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings."""
        length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        ids = self.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt", max_length=length)
        return torch.nn.functional.normalize(self.model.get_text_features(**ids), dim=-1)

    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CLIP score per image with its own text: 100 x max(cosine, 0) (Hessel et al.)."""
        return 100 * (self.images(images) * self.texts(texts)).sum(-1).clamp(min=0)
