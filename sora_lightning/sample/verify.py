"""`sora-verify FILE...`: print a file's C2PA manifest and whether it still matches the file.

    sora-verify samples/000.mp4                          # signature intact? what made it?
    sora-verify --trust-anchors root.pem eval/samples/*  # and signed by a certificate you trust?
    sora-verify --json sample.mp4                        # the whole manifest store as JSON

Exit status: 0 every file is signed and intact (and trusted, with --trust-anchors); 1 a file was
changed after signing, its signature is invalid or (with --trust-anchors) its signer is not
trusted, or its manifest cannot be read; 2 bad usage or a missing file; 3 a file carries no
manifest (unsigned). No network is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import c2pa

from sora_lightning.sample.provenance import (
    GENERATION_LABEL,
    failures,
    media_type,
    read_context,
)

UNTRUSTED = "signingCredential.untrusted"
EXIT = {"intact": 0, "trusted": 0, "tampered": 1, "invalid": 1, "untrusted": 1, "unsigned": 3}


@dataclass
class Verdict:
    """What verifying one file found."""

    path: Path
    status: str
    """trusted | intact | untrusted | tampered | invalid | unsigned (EXIT maps it to a code)."""
    state: str | None = None
    """The C2PA validation state: Trusted, Valid or Invalid (None: no manifest read)."""
    manifest: dict[str, Any] | None = None
    problems: list[dict[str, str]] = field(default_factory=list)
    store: dict[str, Any] | None = None
    """The reader's whole manifest store (for --json)."""


def verify_file(path: str | Path, trust_anchors: str | None = None) -> Verdict:
    """Read `path`'s manifest and judge it (`trust_anchors`: PEM text of trusted roots)."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            reader = c2pa.Reader.try_create(
                media_type(path), stream, None, context=read_context(trust_anchors)
            )
            if reader is None:
                return Verdict(path, "unsigned")
            with reader:
                store = json.loads(reader.json())
    except c2pa.C2paError as error:
        return Verdict(
            path, "invalid", problems=[{"code": "unreadable", "explanation": str(error)}]
        )
    state = store.get("validation_state")
    problems = failures(store.get("validation_results"))
    if not trust_anchors:  # nobody asked whom to trust: an unknown signer is not a failure here
        problems = [p for p in problems if p["code"] != UNTRUSTED]
    manifest = store.get("manifests", {}).get(store.get("active_manifest", ""))
    return Verdict(path, _status(state, problems, trust_anchors), state, manifest, problems, store)


def _status(state: str | None, problems: list[dict[str, str]], trust_anchors: str | None) -> str:
    if state == "Trusted":
        return "trusted"
    if state == "Valid":  # intact; with trust anchors given, the signer is not among them
        return "untrusted" if trust_anchors else "intact"
    if any(p["code"].endswith(".mismatch") for p in problems):
        return "tampered"
    return "invalid"


HEADLINES = {
    "trusted": "signed, intact, signer trusted",
    "intact": "signed and intact (signer not checked: pass --trust-anchors ROOT.pem to check it)",
    "untrusted": "UNTRUSTED: signature intact, but the signer does not chain to the trust anchors",
    "tampered": "TAMPERED: the file changed after it was signed",
    "invalid": "INVALID: the manifest or its signature does not verify",
    "unsigned": "UNSIGNED: no C2PA manifest in this file",
}


def describe(verdict: Verdict) -> str:
    """The human-readable report of one file."""
    state = f" (validation state: {verdict.state})" if verdict.state else ""
    lines = [f"{verdict.path}: {HEADLINES[verdict.status]}{state}"]
    lines += [f"  ! {p['code']}: {p['explanation']}" for p in verdict.problems]
    manifest = verdict.manifest
    if manifest and verdict.status not in ("trusted", "intact"):
        lines.append("  what the manifest claims (do not rely on it):")
    if manifest:
        generators = ", ".join(
            f"{g.get('name')} {g.get('version', '')}".strip()
            for g in manifest.get("claim_generator_info", [])
        )
        signature = manifest.get("signature_info", {})
        lines.append(f"  claim generator: {generators}")
        lines.append(
            f"  signed by: {signature.get('common_name')} (issuer {signature.get('issuer')}, "
            f"{signature.get('alg')})"
        )
        for assertion in manifest.get("assertions", []):
            lines += _assertion_lines(assertion)
    return "\n".join(lines)


def _assertion_lines(assertion: dict[str, Any]) -> list[str]:
    label, data = assertion.get("label", ""), assertion.get("data", {})
    if label.startswith("c2pa.actions"):
        return [
            f"  action: {a.get('action')} ({a.get('digitalSourceType', 'no source type')})"
            for a in data.get("actions", [])
        ]
    if label == GENERATION_LABEL:
        body = json.dumps(data, indent=2, ensure_ascii=False).replace("\n", "\n    ")
        return [f"  {GENERATION_LABEL}:", f"    {body}"]
    return []


def exit_code(verdicts: Sequence[Verdict]) -> int:
    """1 if any file failed verification, else 3 if any is unsigned, else 0."""
    codes = {EXIT[v.status] for v in verdicts}
    return 1 if 1 in codes else max(codes, default=0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sora-verify", description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="mp4 or PNG files to verify")
    parser.add_argument(
        "--trust-anchors", type=Path, help="PEM root certificate(s): also require a trusted signer"
    )
    parser.add_argument("--json", action="store_true", help="print the manifest store as JSON")
    args = parser.parse_args(argv)
    missing = [str(p) for p in [*args.files, args.trust_anchors] if p and not p.is_file()]
    if missing:
        parser.error(f"not a file: {', '.join(missing)}")
    anchors = args.trust_anchors.read_text() if args.trust_anchors else None
    verdicts = [verify_file(path, anchors) for path in args.files]
    for verdict in verdicts:
        if args.json:
            print(
                json.dumps(
                    {"file": str(verdict.path), "status": verdict.status, "store": verdict.store},
                    indent=2,
                )
            )
        else:
            print(describe(verdict))
    return exit_code(verdicts)


if __name__ == "__main__":
    sys.exit(main())
