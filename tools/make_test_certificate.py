"""Write a throwaway C2PA signing chain (root CA + ES256 signer) to try signed provenance.

    python tools/make_test_certificate.py --output certs/
    sora-sample ckpt=runs/demo/export prompt="a red circle moves left" \
        provenance.cert=certs/signer-chain.pem provenance.key=certs/signer-key.pem
    sora-verify --trust-anchors certs/signer-root.pem sample.mp4

For trying only (30 days, labelled a test signer): publish with a certificate your organisation
issues. Existing files are never overwritten.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sora_lightning.sample.certificates import make_chain


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, type=Path, help="folder for the PEM files")
    parser.add_argument("--name", default="signer", help="file prefix and common name")
    args = parser.parse_args(argv)
    chain = make_chain(args.output, args.name)
    print(f"provenance.cert={chain.cert} provenance.key={chain.key}  (trust anchor: {chain.root})")


if __name__ == "__main__":
    main()
