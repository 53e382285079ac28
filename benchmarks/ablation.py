"""The ablation table of issue 14: what each training lever adds, per protocol, from the records in retrieval.json.

Every row is one record (a baseline, a training run, or an adapted model: `tfr adapt`), described by its recipe: how
deep training reached, the loss, the hashing layer, the adaptation. Deltas are against the protocol's baseline and its
head-only triplet run at the same image size. Nothing is recomputed: the figures are the records' (their commands
reproduce them).

    python benchmarks/ablation.py [--records benchmarks/results/retrieval.json] [--out reports/compare/ablation.md]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from tf_retrieval.config import END_TO_END, TrainConfig
from tf_retrieval.evaluation.evaluate import SEARCH_VARIANTS

PROTOCOLS = ("cifar10-2", "cifar10-1", "cifar10-unseen", "flowers-official", "flowers-disjoint")
#: The headline metric of each protocol (the issue's goals), then the others shown.
HEADLINE = {"flowers-disjoint": "MAP@R"}
COLUMNS = ("mAP", "MAP@R", "R@1")


def recipe(record: dict) -> str:
    """A short description of how a record's vectors were made."""
    backbone = "" if record["backbone"] == "efficientnet_lite0" else record["backbone"].replace("efficientnet_", "") + " "
    scales = (", multi-scale x" + "/".join(f"{x:g}" for x in record["scales"])) if record.get("scales") else ""
    scales += ", test-time flip" if record.get("flip") else ""
    scales += f", {record['preprocessing']} inputs" if record.get("preprocessing") else ""
    baseline = backbone + "frozen baseline" + (", GeM pooling" if record.get("pooling") == "gem" else "") + scales
    if record["model"] == "baseline" and not record.get("variant"):
        return baseline
    config = record.get("config") or {}
    parts = []
    if record["model"] == "baseline":
        parts.append(baseline)
    else:
        cut = record.get("train_from")
        parts.append({None: "head only", END_TO_END: "end to end, images flipped and shifted on the fly"}.get(
            cut, f"top blocks from {cut}"))
        if not cut and record.get("weights") != "imagenet":  # a head trained on another run's fine-tuned trunk
            parts.append(f"on a fine-tuned trunk ({os.path.basename(record['weights'])})")
        elif record.get("starts_from"):  # a trunk trained on from where another run left it
            parts.append(f"starting from the trunk of {record['starts_from'][-1]['run']}")
        loss = config.get("mining", "semihard") + " triplet"
        if config.get("proxy_loss"):
            loss += f" + {config['proxy_loss']}"
        parts.append(loss)
        if config.get("augment"):
            parts.append("cached " + "/".join(config["augment"]) + " views")
        if config.get("randaugment"):
            parts.append(f"RandAugment {config['randaugment']:g}")
        if config.get("lr_schedule", "constant") != "constant":
            parts.append(f"{config['lr_schedule']} learning rate from {config['learning_rate']:g}")
        if config.get("trunk_lr_scale", 1) != 1:
            parts.append(f"trunk at {config['trunk_lr_scale']:g} x the head's rate")
        if config.get("seed", 0):
            parts.append(f"seed {config['seed']}")
        against_training = config.get("validate_against") == "training"
        if config.get("validation_fraction") == 0:
            chosen = "; the epochs chosen by held-out images searching the training images" if against_training else ""
            parts.append(f"final fit on every training image ({record['train_epochs']} epochs, no validation{chosen})")
        elif against_training:
            parts.append("validated by held-out images searching the training images")
        if backbone:
            parts.insert(0, backbone.strip())
        if record.get("hash_bits"):
            parts.append(f"{record['hash_bits']}-bit {config.get('hashing', 'tanh')} codes")
        parts.append(f"{record['embedding_dim'] if not record.get('hash_bits') else record['hash_bits']}-d")
    if record["model"] != "baseline" and record.get("pooling") == "gem":
        parts.append("GeM pooling")
    if record["model"] != "baseline" and scales:
        parts.append(scales[2:])
    if record.get("variant") and record["variant"] not in SEARCH_VARIANTS:
        parts.append(record["variant"])
    return ", ".join(parts)


#: The head-only reference's recipe: `TrainConfig`'s defaults (a tuned head or one trained with augmentation is a row
#: of its own, measured against this one).
PLAIN_HEAD = {field: json.loads(json.dumps(getattr(TrainConfig(), field))) for field in  # as a record holds them
              ("embedding_dim", "mining", "margin", "learning_rate", "lr_schedule", "augment", "randaugment")}


def _reference(records: list[dict], protocol: str, size: int, which: str,
               backbone: str = "efficientnet_lite0", flip: bool = False, preprocessing: str | None = None) -> dict | None:
    """The protocol's frozen baseline (`which="baseline"`) or head-only triplet run ("head") of `backbone` at `size`,
    with test-time `flip` or without: records of the baseline benchmark and of the LiteRT runtime first, then the
    newest."""
    def matches(r):
        if r["protocol"] != protocol or r["image_size"] != size or r.get("variant") or r.get("pooling") != "avg" \
                or r["backbone"] != backbone or r.get("weights") != "imagenet" or bool(r.get("flip")) != flip \
                or r.get("preprocessing") != preprocessing:
            return False
        if which == "baseline":
            return r["model"] == "baseline"
        config = r.get("config") or {}  # the plain head: triplet alone, validated (not a final fit), default recipe
        return (r["model"] == "finetuned" and not r.get("train_from") and not r.get("hash_bits")
                and not config.get("proxy_loss") and config.get("validation_fraction") != 0
                and all(config.get(field) in (None, value) for field, value in PLAIN_HEAD.items()))

    candidates = [r for r in records if matches(r)]
    candidates.sort(key=lambda r: (r.get("run") is not None if which == "baseline" else False,
                                   r.get("runtime", "tf") != "litert", -records.index(r)))
    return candidates[0] if candidates else None


def _each_baseline_once(rows: list[dict]) -> list[dict]:
    """`rows` without the repeats of a baseline that was scored beside several runs (same size, recipe, weights and
    runtime)."""
    kept, seen = [], set()
    for r in rows:
        if r["model"] == "baseline":
            key = (r["image_size"], recipe(r), r.get("weights"), r.get("runtime"))
            if key in seen:
                continue
            seen.add(key)
        kept.append(r)
    return kept


def ablation_markdown(records: list[dict]) -> str:
    """The Markdown report: one table per protocol."""
    lines = ["# Ablation: what each lever adds (issue 14)", "",
             "Generated by `python benchmarks/ablation.py` from `benchmarks/results/retrieval.json` (each row's "
             "command is in its record). EfficientNet-Lite0 ImageNet backbone unless the recipe names lite1/lite2, "
             "exact ranking, relevance = same class. Δ base = against the frozen baseline (of the same input "
             "normalisation); Δ head = against the head-only triplet run of the default recipe (128-d, margin 0.2, no "
             "augmentation; LiteRT features first), both of the same backbone at the same size, with the same "
             "test-time flip (– where there is none). Rows of search-side options (α-QE, α-DBA) are left out: "
             "`reports/compare/report.md` has them.", ""]
    for protocol in PROTOCOLS:
        rows = [r for r in records if r["protocol"] == protocol and r.get("variant") not in SEARCH_VARIANTS
                and r["backbone"].startswith("efficientnet_lite") and r.get("pooling") in ("avg", "gem")
                and (r["model"] != "baseline" or r.get("variant") or r.get("pooling") == "gem" or r.get("flip")
                     or r.get("preprocessing")
                     or _reference(records, protocol, r["image_size"], "baseline", r["backbone"]) is r)]
        rows = _each_baseline_once(rows)
        if not rows:
            continue
        headline = HEADLINE.get(protocol, "mAP")
        lines += [f"## {protocol}", "", f"| px | recipe | run | runtime | {' | '.join(COLUMNS)} | Δ base ({headline}) "
                  f"| Δ head ({headline}) | train s |", "|" + "---|" * (len(COLUMNS) + 7)]
        for r in sorted(rows, key=lambda r: (r["image_size"], r["metrics"].get(headline, 0))):
            deltas = []
            for which in ("baseline", "head"):
                ref = _reference(records, protocol, r["image_size"], which, r["backbone"], bool(r.get("flip")),
                                 r.get("preprocessing") if which == "baseline" else None)
                same = ref is r or (ref is not None and (ref["model"], recipe(ref), ref.get("runtime"))
                                    == (r["model"], recipe(r), r.get("runtime")))  # the same thing, scored again
                deltas.append("–" if ref is None or same
                              else f"{r['metrics'][headline] - ref['metrics'][headline]:+.3f}")
            values = [f"{r['metrics'][c]:.3f}" if c in r["metrics"] else "–" for c in COLUMNS]
            lines.append(f"| {r['image_size']} | {recipe(r)} | {r.get('run') or '–'} | {r.get('runtime', 'tf')} | "
                         f"{' | '.join(values)} | {' | '.join(deltas)} | {r.get('train_seconds', '–')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", default="benchmarks/results/retrieval.json")
    parser.add_argument("--out", default="reports/compare/ablation.md")
    args = parser.parse_args(argv)
    with open(args.records) as f:
        records = json.load(f)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(ablation_markdown(records))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
