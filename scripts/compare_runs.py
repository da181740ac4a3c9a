"""Compare two output directories of approximate.py (e.g. one process against torchrun with several).

    python scripts/compare_runs.py runs/one runs/two --out results/distributed.jsonl

Checks the calibration stores row by row (image ordinals and positions equal, largest response difference),
the per-layer ranks and energies of the reports, and the approximated models' outputs on seeded inputs;
prints the comparison and appends it as one JSON line to --out (when given).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from calibration import open_calibration  # noqa: E402
from lowrank_fm.zoo.models import load_bundled_approximated  # noqa: E402


def compare(first: Path, second: Path) -> dict:
    result: dict = {"kind": "compare", "first": str(first), "second": str(second)}
    with open_calibration(first / "calibration.h5") as one, open_calibration(second / "calibration.h5") as two:
        result["layers"] = one.layers
        result["images"] = [one.n_images, two.n_images]
        result["same_ordinals_and_positions"] = one.layers == two.layers and all(
            np.array_equal(one.image_ordinal(n), two.image_ordinal(n)) and np.array_equal(one.position(n), two.position(n))
            for n in one.layers)
        result["max_rel_response_diff"] = max(
            float(np.abs(one.responses(n) - two.responses(n)).max() / max(np.abs(one.responses(n)).max(), 1e-30))
            for n in one.layers) if result["same_ordinals_and_positions"] else None
    reports = [json.loads((d / "report.json").read_text()) for d in (first, second)]
    result["same_ranks"] = [r["rank"] for r in reports[0]["layers"]] == [r["rank"] for r in reports[1]["layers"]]
    result["max_energy_diff"] = max(abs((a["energy"] or 0.0) - (b["energy"] or 0.0))
                                    for a, b in zip(reports[0]["layers"], reports[1]["layers"]))
    result["top1_after"] = [r["accuracy"]["top1_after"] for r in reports]
    result["processes"] = [r["calibration"].get("processes", 1) for r in reports]
    result["threads"] = [r.get("config", {}).get("run", {}).get("threads") for r in reports]
    # rank 0's seconds per stage (under torchrun each rank runs its shard of calibration and the layer-wise pass)
    result["timing"] = [{k: round(v, 3) for k, v in r.get("timing", {}).items()} for r in reports]
    models = [load_bundled_approximated(d) for d in (first, second)]
    shape = tuple(reports[0]["layers"][0]["shape"])  # the first layer's weight: (out, in, kh, kw)
    x = _probe(models[0], shape[1])
    with torch.no_grad():
        outputs = [model(x) for model in models]
    result["max_output_diff"] = float((outputs[0] - outputs[1]).abs().max())
    result["output_scale"] = float(outputs[0].abs().max())
    return result


def _probe(model: torch.nn.Module, channels: int) -> torch.Tensor:
    """16 seeded images of the first square size (28, 8, 32, 224) that the model accepts."""
    generator = torch.Generator().manual_seed(0)
    for side in (28, 8, 32, 224):
        x = torch.randn(16, channels, side, side, generator=generator)
        try:
            with torch.no_grad():
                model(x)
            return x
        except RuntimeError:
            continue
    raise ValueError("could not find an input size the model accepts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--out", default=None)
    parser.add_argument("--note", default=None, help="free text stored in the row (e.g. the two commands)")
    args = parser.parse_args(argv)
    result = compare(args.first, args.second)
    if args.note:
        result["note"] = args.note
    print(json.dumps(result, indent=2))
    if args.out:
        from lowrank_fm.bench.provenance import append_row

        append_row(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
