#!/usr/bin/env bash
# One-shot GPU check (flash-attn vs SDPA, training-step MFU, ZeRO-3, sampling): one JSON on stdout.
# Thin wrapper so a lent machine runs one command; all options go to tools/gpu_check.py
# (--cpu for the tiny CPU run, --out FILE, --peak-flops N, --parts ...). PYTHON picks the
# interpreter (default: python on PATH, i.e. the active venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" tools/gpu_check.py "$@"
