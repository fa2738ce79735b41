"""`python -m pipeline.ingest --source DIR [--source DIR ...] --out ROOT [options]`
or `python -m pipeline.ingest --verify STORE [--verify STORE ...]`.

Flags override the `ingest` section of `--config` (defaults otherwise). Storage options for an
s3:// ROOT come from the usual AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or
`--storage-options '{"endpoint_url": "http://127.0.0.1:9000"}'`.

Every source is ingested even when another one is bad; each problem is one line naming the
file. `--verify` re-reads every array of a store and checks every chunk's CRC32C, one line per
corrupt array.

Exit status: 0 all done (or the stores are sound); 2 bad input: a bad option, an unwritable
--out, a bad dataset.json, a case that failed its checks or is missing files (its stored copy,
if any, is kept and marked stale), a corrupt store under --verify; 1 something else failed
(a full disk, a bug).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import yaml

from pipeline.common.cli import EXIT_BAD_INPUT, stage_parser
from pipeline.common.config import ConfigError, IngestConfig, config_from_dict
from pipeline.common.logs import setup_logging
from pipeline.ingest.run import OutputError, run
from pipeline.ingest.verify import verify_stores

log = logging.getLogger("pipeline.ingest")


_DEFAULT = IngestConfig()


def _parser() -> argparse.ArgumentParser:
    p = stage_parser("pipeline.ingest", __doc__)
    p.add_argument("--source", action="append", metavar="DIR",
                   help="raw dataset folder with dataset.json (MSD or nnU-Net v2); repeatable")
    p.add_argument("--out", metavar="ROOT", help="local folder or s3://bucket/prefix")
    p.add_argument("--verify", action="append", metavar="STORE",
                   help="instead of ingesting: re-read a store and check every chunk's checksum; repeatable")
    p.add_argument("--change-detection", choices=["content", "stat"],
                   help="re-ingest a case when its files' content changes (hashing them), or trust unchanged "
                        f"names, sizes and mtimes (stat: faster, misses edits that keep them) "
                        f"(default {_DEFAULT.change_detection})")
    p.add_argument("--config", metavar="YAML", help="experiment config whose `ingest` section is the base")
    p.add_argument("--target-spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="mm; default: planned")
    p.add_argument("--ct-normalization", choices=["nnunet", "uniseg-window"],
                   help="CT intensities: nnU-Net's clip to the foreground 0.5-99.5 percentiles + z-score, or "
                        f"UniSeg's fixed window (default {_DEFAULT.ct_normalization})")
    p.add_argument("--image-order", type=int, choices=[1, 3],
                   help=f"spline order when resampling images (default {_DEFAULT.image_order})")
    p.add_argument("--label-resampling", choices=["nearest", "per-class-linear"],
                   help=f"how label maps are resampled (default {_DEFAULT.label_resampling})")
    p.add_argument("--folds", type=int,
                   help=f"cross-validation folds per store, stable per case; fold 0 is the validation split "
                        f"(default {_DEFAULT.folds})")
    p.add_argument("--split-seed", type=int, help=f"seed of the fold draw (default {_DEFAULT.split_seed})")
    p.add_argument("--chunk-size", type=int, nargs=3, metavar=("Z", "Y", "X"),
                   help=f"voxels per Zarr chunk (default {' '.join(map(str, _DEFAULT.chunk_size))})")
    p.add_argument("--max-class-locations", type=int,
                   help=f"voxels kept per class for foreground oversampling (default {_DEFAULT.max_class_locations})")
    p.add_argument("--overwrite", action="store_true", default=None, help="delete existing stores first")
    p.add_argument("--scheduler", metavar="ADDR",
                   help="address of an existing Dask scheduler, or synchronous|threads (in-process)")
    p.add_argument("--on-ray", action="store_true", default=None, help="run the tasks on Ray (Dask on Ray)")
    p.add_argument("--num-workers", type=int, help="local Dask cluster size (default: CPU count)")
    p.add_argument("--host", help="interface a local Dask cluster (and dashboard) or local Ray listens on "
                                  "(default 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--storage-options", type=json.loads, metavar="JSON", help="fsspec options for ROOT")
    return p


_NOT_INGEST = {"source", "out", "config", "storage_options", "verify"}


def _ingest_config(args: argparse.Namespace) -> IngestConfig:
    """The config file's `ingest` section (only that one: its stores may not exist yet), then flags."""
    section = _config_section(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_INGEST and v is not None}
    return config_from_dict({"ingest": {**section, **flags}}, args.config or "<command line>").ingest


def _config_section(path: str) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read config: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw.get("ingest") or {}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.verify:
        return verify_stores(args.verify, args.storage_options)
    if not args.source or not args.out:
        parser.error("--source and --out are required (or --verify STORE)")
    try:
        cfg = _ingest_config(args)
        log.info("ingest options: %s", dataclasses.asdict(cfg))
        return run(args.source, args.out, cfg, args.storage_options).exit_status
    except (ConfigError, OutputError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
