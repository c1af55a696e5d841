"""Signed provenance (C2PA): every mp4 and PNG that sora-sample and sora-eval write says how it was made.

Why: a generated video travels without its run folder. A C2PA manifest embedded in the file
states that it is AI-generated (a `c2pa.created` action with the IPTC digital source type
trainedAlgorithmicMedia), which software made it, and with what (the `org.sora_lightning.generation`
assertion: prompt, expanded prompt and what expanded it, seed, model hash, sampling options,
safety checks), and a signature over the file's bytes lets anyone check that none of it changed
(`sora-verify FILE`).

The key and certificate chain come from config (`provenance.cert`, `provenance.key`); with none,
outputs are written unsigned and the run says so once. Signing needs no network: no timestamp
authority is used, so a signature is checked against the certificate's validity only.
Writers go through `Provenance.writing`: the media is written to a temp file, signed into a
second temp file beside the target and renamed over it, so a failed signature leaves no file.
"""

from __future__ import annotations

import io
import json
import logging
import mimetypes
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import c2pa
import numpy as np
from PIL import Image

from sora_lightning import __version__

log = logging.getLogger(__name__)

CLAIM_GENERATOR = {"name": "sora_lightning", "version": __version__}
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
GENERATION_LABEL = "org.sora_lightning.generation"
"""Label of the assertion that holds the generation record."""
ALGORITHMS = {
    "es256": c2pa.C2paSigningAlg.ES256,
    "es384": c2pa.C2paSigningAlg.ES384,
    "es512": c2pa.C2paSigningAlg.ES512,
    "ps256": c2pa.C2paSigningAlg.PS256,
    "ps384": c2pa.C2paSigningAlg.PS384,
    "ps512": c2pa.C2paSigningAlg.PS512,
    "ed25519": c2pa.C2paSigningAlg.ED25519,
}
MEDIA_TYPES = {".mp4": "video/mp4", ".png": "image/png", ".jpg": "image/jpeg"}
GOOD_STATES = ("Valid", "Trusted")
"""Validation states of an intact file (Trusted: its chain ends in a given trust anchor)."""


@dataclass
class ProvenanceConfig:
    """The `provenance` node: where the signing credentials are (all paths to PEM files)."""

    cert: str | None = None
    """Certificate chain, the signing (end-entity) certificate first; null: outputs unsigned."""
    key: str | None = None
    """Private key of the signing certificate (PKCS#8 PEM)."""
    trust_anchors: str | None = None
    """Root certificate(s) the chain must end in; checked once at start, before any model loads."""
    alg: str = "es256"
    """Signature algorithm, matching the key: es256/384/512, ps256/384/512, ed25519."""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError(
                "provenance.cert and provenance.key go together: give both (to sign outputs) "
                "or neither (outputs unsigned)"
            )
        for name in ("cert", "key", "trust_anchors"):
            value = getattr(self, name)
            if value and not Path(value).expanduser().is_file():
                raise ValueError(f"provenance.{name}={value} is not a file")
        if self.trust_anchors and not self.cert:
            raise ValueError("provenance.trust_anchors needs provenance.cert and provenance.key")
        if self.alg.lower() not in ALGORITHMS:
            raise ValueError(f"provenance.alg={self.alg!r} is not one of {sorted(ALGORITHMS)}")

    @property
    def signs(self) -> bool:
        return bool(self.cert)

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> ProvenanceConfig:
        """The `provenance` node of a composed config (absent: unsigned); unknown keys refused."""
        node = dict(node or {})
        unknown = sorted(set(node) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown provenance keys {unknown}; known: {_names(cls)}")
        return cls(**node)

    def as_overrides(self, prefix: str = "provenance") -> list[str]:
        """`prefix.key=value` (absolute paths, JSON values) so another process signs the same way:
        the pipeline's samples and eval steps."""
        paths = ("cert", "key", "trust_anchors")
        return [
            f"{prefix}.{key}={json.dumps(absolute_path(value) if key in paths else value)}"
            for key, value in asdict(self).items()
        ]


def _names(cls: type) -> list[str]:
    return sorted(f.name for f in fields(cls))


def absolute_path(value: str | None) -> str | None:
    """A user-given path as an absolute one (`~` expanded), so another process finds it too."""
    return str(Path(value).expanduser().resolve()) if value else value


def generation_record(video: Any, safety: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `org.sora_lightning.generation` assertion of a generated video (a `GeneratedVideo`)."""
    return {
        "prompt": video.prompt,
        "expanded_prompt": video.expanded_prompt,
        "prompt_expander": dict(video.prompt_expander),
        "seed": video.seed,
        "model_hash": video.model_hash,
        "options": dict(video.options),
        "safety": dict(safety) if safety is not None else None,
    }


def manifest(title: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest definition signed into a file: generator, the created action, the record."""
    created = {
        "action": "c2pa.created",
        "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
        "softwareAgent": CLAIM_GENERATOR,
    }
    return {
        "claim_generator_info": [CLAIM_GENERATOR],
        "title": title,
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": [created]}},
            {
                "label": GENERATION_LABEL,
                "data": keep_number_lists(json.loads(json.dumps(dict(record)))),
            },
        ],
    }


def keep_number_lists(value: Any) -> Any:
    """`value` with every list of numbers as its JSON text, e.g. [0.0, 0.7] -> "[0.0, 0.7]".

    Why: c2pa 0.38.1 (c2pa-rs 0.91) stores a JSON array of numbers as a byte string, each number
    cast to one byte ([0.0, 0.7] reads back as "", [1, 300] as "ASw="); text survives exactly.
    """
    if isinstance(value, dict):
        return {key: keep_number_lists(item) for key, item in value.items()}
    if isinstance(value, list):
        numbers = value and all(
            isinstance(item, (int, float)) and not isinstance(item, bool) for item in value
        )
        return json.dumps(value) if numbers else [keep_number_lists(item) for item in value]
    return value


def media_type(path: str | Path) -> str:
    """MIME type of a file to sign or read, from its suffix."""
    suffix = Path(path).suffix.lower()
    found = MEDIA_TYPES.get(suffix) or mimetypes.guess_type(str(path))[0]
    if found is None:
        raise ValueError(f"{path}: no media type known for suffix {suffix!r}")
    return found


def read_context(trust_anchors: str | None) -> c2pa.Context | None:
    """Reader settings that check the signer's chain against `trust_anchors` (PEM text)."""
    if not trust_anchors:
        return None
    return c2pa.Context.from_dict(
        {"verify": {"verify_trust": True}, "trust": {"trust_anchors": trust_anchors}}
    )


def failures(results: Mapping[str, Any] | None) -> list[dict[str, str]]:
    """The active manifest's failed checks ({code, explanation}) from `validation_results`."""
    active = (results or {}).get("activeManifest") or {}
    return [
        {"code": f["code"], "explanation": f.get("explanation", "")}
        for f in active.get("failure", [])
    ]


class Provenance:
    """Signs outputs with the configured credentials, or writes them unsigned (warned once)."""

    def __init__(self, config: ProvenanceConfig) -> None:
        self.config = config
        self._signer: c2pa.Signer | None = None
        if not config.signs:
            log.warning(
                "provenance: no provenance.cert/provenance.key configured, so outputs are written "
                "UNSIGNED (no C2PA manifest); set both to sign them"
            )
            return
        self._signer = self._load_signer()
        self._check()

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> Provenance:
        return cls(ProvenanceConfig.from_config(node))

    @property
    def signs(self) -> bool:
        return self._signer is not None

    def _load_signer(self) -> c2pa.Signer:
        chain = Path(self.config.cert).expanduser().read_bytes()
        key = Path(self.config.key).expanduser().read_bytes()
        info = c2pa.C2paSignerInfo(ALGORITHMS[self.config.alg.lower()], chain, key, None)
        try:
            return c2pa.Signer.from_info(info)
        except c2pa.C2paError as error:
            raise ValueError(
                f"provenance.key={self.config.key} with provenance.cert={self.config.cert} "
                f"(alg {self.config.alg}) cannot sign: {error}"
            ) from error

    def _check(self) -> None:
        """Sign a tiny image in memory and read it back, so a key that does not match the
        certificate, a certificate C2PA refuses (its EKU) or a chain outside `trust_anchors`
        fails at start, before any model loads, not after the first video."""
        image = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image, format="PNG")
        signed = io.BytesIO()
        try:
            self.sign_stream(image, signed, "image/png", "check.png", {"check": True})
            signed.seek(0)
            with c2pa.Reader("image/png", signed, context=read_context(self._anchors())) as reader:
                state, results = reader.get_validation_state(), reader.get_validation_results()
        except c2pa.C2paError as error:
            raise ValueError(f"provenance: a test signature failed: {error}") from error
        wanted = ("Trusted",) if self.config.trust_anchors else GOOD_STATES
        if state not in wanted:
            codes = [f"{f['code']} ({f['explanation']})" for f in failures(results)]
            raise ValueError(
                f"provenance: a test signature reads back as {state!r}, not {' or '.join(wanted)}: "
                f"{'; '.join(codes) or 'no details'} (cert {self.config.cert}, trust_anchors "
                f"{self.config.trust_anchors})"
            )

    def _anchors(self) -> str | None:
        anchors = self.config.trust_anchors
        return Path(anchors).expanduser().read_text() if anchors else None

    def sign_stream(
        self, source: Any, dest: Any, mime: str, title: str, record: Mapping[str, Any]
    ) -> None:
        """Sign the media in `source` (a binary stream) into `dest` with the generation record."""
        if self._signer is None:
            raise RuntimeError("provenance is not configured to sign (no provenance.cert/key)")
        with c2pa.Builder(manifest(title, record)) as builder:
            builder.sign(self._signer, mime, source, dest)

    @contextmanager
    def writing(self, path: str | Path, record: Mapping[str, Any]) -> Iterator[Path]:
        """Yield a temp path to write `path`'s media to; on success `path` appears, signed.

        The unsigned media stays in a hidden temp file; it is signed into a second one that
        replaces `path` atomically (`utils.atomic_path`). On any error both temp files go and
        `path` is left as it was, so a failed signature never leaves a partial or unsigned file.
        """
        # utils imports torch: imported here, sora-verify (which only reads) starts seconds sooner
        from sora_lightning.utils import atomic_path, temp_path_for

        path = Path(path)
        with atomic_path(path) as final:
            if self._signer is None:
                yield final
                return
            raw = temp_path_for(path)
            try:
                yield raw
                with open(raw, "rb") as source, open(final, "w+b") as dest:
                    self.sign_stream(source, dest, media_type(path), path.name, record)
            finally:
                raw.unlink(missing_ok=True)


@contextmanager
def output_path(
    path: str | Path, provenance: Provenance | None, record: Mapping[str, Any] | None
) -> Iterator[Path]:
    """`provenance.writing(path, record)`, or a plain atomic write when `provenance` is None."""
    if provenance is None:
        from sora_lightning.utils import atomic_path  # here, not at the top: see writing()

        with atomic_path(path) as tmp:
            yield tmp
    else:
        with provenance.writing(path, record or {}) as tmp:
            yield tmp
