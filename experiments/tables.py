"""Prints the Markdown tables of experiments/README.md from the results JSONs.

Run:  python3 -m experiments.tables --out experiments/results
"""

from __future__ import annotations

import argparse
import json
import os


def _load(out: str, name: str) -> dict | None:
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def parameterization(r: dict) -> str:
    rows = []
    for kind, m in r["models"].items():
        bpd = f"{m['bpd']:.3g} ± {m['bpd_stderr']:.2g}"
        ode = f"{m['ode_bpd']:.3g} ± {m['ode_bpd_stderr']:.2g}" if "ode_bpd" in m else ""
        rows.append(
            [kind, m["fd_train"], m["fd_test"], m["precision"], m["recall"]]
            + [m["inception_score"], bpd, m["bpd_kl"], m["bpd_decoder"], ode]
            + [m.get("ode_bpd_256", ""), m["run"]["final_loss"]]
        )
    head = ["prediction", "fd_train", "fd_test", "precision", "recall", "IS", "bits/dim"]
    head += ["(KL terms)", "(decoder L_0)", "bits/dim, ODE", "(ODE, 256 steps)"]
    out = [_table(head + ["final train loss"], rows)]
    if "ode_bpd_paired" in r:
        pairs = [
            [pair, d["mean"], d["stderr"], d["fraction_below_0"]]
            for pair, d in r["ode_bpd_paired"].items()
        ]
        head = ["ODE bits/dim, per digit", "mean", "stderr", "fraction < 0"]
        out.append("\n" + _table(head, pairs))
    edges = next(iter(r["models"].values()))["loss_by_t"]["bucket_edges"]
    buckets = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    for key in ("own_mse", "eps_mse", "x0_mse"):
        rows = [[kind] + m["loss_by_t"][key] for kind, m in r["models"].items()]
        out.append(f"\n{key} per t bucket (test digits):\n\n" + _table(["t"] + buckets, rows))
    return "\n".join(out)


def sampler_sweep(r: dict) -> str:
    out = []
    for count in sorted({row["num_samples"] for row in r["rows"]}, reverse=True):
        rows = [row for row in r["rows"] if row["num_samples"] == count]
        steps = sorted({row["steps"] for row in rows})
        for key in ("fd_train", "precision", "recall"):
            table = []
            for label in dict.fromkeys(row["sampler"] for row in rows):
                by = {row["steps"]: row[key] for row in rows if row["sampler"] == label}
                table.append([label] + [by.get(n, "") for n in steps])
            head = [f"{key}, N={count}"] + [f"{n} steps" for n in steps]
            out.append(_table(head, table) + "\n")
    return "\n".join(out)


def variance_loss(r: dict) -> str:
    rows = []
    for variance, e in r["variance"].items():
        ddpm = [k for k in e if k.startswith("ddpm")]
        row = [variance, f"{e['bpd']:.3g} ± {e['bpd_stderr']:.2g}", e["bpd_decoder"]]
        for k in ddpm:
            row += [f"{e[k]['fd_train']:.3g} / {e[k]['precision']:.2f} / {e[k]['recall']:.2f}"]
        rows.append(row)
    head = ["sigma^2", "bits/dim", "(decoder L_0)"]
    head += [f"{k} (N={e[k]['num_samples']}): fd_train / P / R" for k in ddpm]
    out = [_table(head, rows), ""]
    rows = []
    for name, m in r["models"].items():
        samplers = [k for k in m if k[:4] in ("ddim", "ddpm")]
        row = [name, f"{m['bpd']:.3g} ± {m['bpd_stderr']:.2g}"]
        row += [
            f"{m[k]['fd_train']:.3g} / {m[k]['precision']:.2f} / {m[k]['recall']:.2f}"
            for k in samplers
        ]
        row += [m["run"]["final_loss"]]
        rows.append(row)
    head = ["objective", "bits/dim"] + [f"{k}: fd_train / P / R" for k in samplers]
    out.append(_table(head + ["final train loss"], rows))
    edges = next(iter(r["models"].values()))["loss_by_t"]["bucket_edges"]
    buckets = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    rows = [[name] + m["loss_by_t"]["eps_mse"] for name, m in r["models"].items()]
    out.append("\neps_mse per t bucket (test digits):\n\n" + _table(["t"] + buckets, rows))
    return "\n".join(out)


def guidance(r: dict) -> str:
    keys = ("class_accuracy", "fd_train", "precision", "recall", "inception_score")
    rows = [[row["guidance"]] + [row[k] for k in keys + ("within_class_var",)] for row in r["rows"]]
    ref = r["reference"]["within_class_var_train"]
    head = ["w", *keys, f"within-class var (train digits: {ref:.3g})"]
    out = _table(head, rows)
    if r.get("rescaled_rows"):
        rows = [
            [row["guidance"], row["guidance_rescale"]]
            + [row[k] for k in keys + ("within_class_var",)]
            for row in r["rescaled_rows"]
        ]
        out += "\n\nrescaled guidance:\n\n" + _table(["w", "phi", *head[1:]], rows)
    return out


def distillation(r: dict) -> str:
    rows = r["rows"]
    top = max(row["steps"] for row in rows)
    by = {(row["model"], row["steps"]): row for row in rows}
    rounds = {rec["student_steps"]: rec for rec in r["rounds"]}

    def cell(row):
        return f"{row['fd_train']:.3g} / {row['precision']:.2f} / {row['recall']:.2f}"

    table = [[top, cell(by["ddim", top]), "(reference)", "", "", ""]]
    for n in sorted((n for m, n in by if m == "distilled"), reverse=True):
        rec = rounds[n]
        table.append(
            [n, cell(by["ddim", n]), cell(by["distilled", n]), cell(by["distilled_clipped", n])]
            + [f"{rec['train_seconds']:.0f}", rec["final_loss"]]
        )
    head = ["steps", "base model, DDIM: fd_train / P / R", "distilled: fd_train / P / R"]
    head += ["distilled, clip_denoised"]
    head += ["round train s", "final distillation loss"]
    return f"N = {r['num_samples']}:\n\n" + _table(head, table)


def classifier_guidance(r: dict) -> str:
    keys = ("class_accuracy", "fd_train", "precision", "recall", "inception_score")
    rows = [[row["scale"]] + [row[k] for k in keys + ("within_class_var",)] for row in r["rows"]]
    ref = r["reference"]["within_class_var_train"]
    head = ["s", *keys, f"within-class var (train digits: {ref:.3g})"]
    out = [f"N = {r['num_samples']}:\n\n" + _table(head, rows)]
    clf = r["classifier"]
    acc = clf["accuracy_by_t"]
    edges = acc["bucket_edges"]
    buckets = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    out.append(
        f"\nnoise-aware classifier ({clf['steps']} steps, {clf['train_seconds']:.0f} s, final "
        f"loss {clf['final_loss']:.3g}) on noised test digits per t bucket:\n\n"
        + _table(["t"] + buckets, [["accuracy"] + acc["accuracy"], ["log p(y)"] + acc["log_prob"]])
    )
    return "\n".join(out)


def flow_matching(r: dict) -> str:
    nfes = r["nfes"]
    out = []
    for key in ("fd_train", "precision", "recall"):
        table = []
        for model, method in dict.fromkeys((row["model"], row["method"]) for row in r["rows"]):
            by = {
                row["nfe"]: row[key]
                for row in r["rows"]
                if (row["model"], row["method"]) == (model, method)
            }
            table.append([f"{model} {method}"] + [by.get(n, "") for n in nfes])
        out.append(_table([f"{key}, N={r['num_samples']}"] + [f"NFE {n}" for n in nfes], table))
    rows = []
    for model, m in r["models"].items():
        ode = f"{m['ode_bpd']:.3g} ± {m['ode_bpd_stderr']:.2g}" if "ode_bpd" in m else ""
        rows.append([model, f"{m['bpd']:.3g} ± {m['bpd_stderr']:.2g}", ode, m["run"]["final_loss"]])
    head = ["model", "bits/dim, VLB of the denoiser", "bits/dim, ODE (dequantized)"]
    out.append(_table(head + ["final train loss"], rows))
    return "\n\n".join(out)


def consistency(r: dict) -> str:
    keys = ("fd_train", "precision", "recall")
    models = dict.fromkeys(row["model"] for row in r["rows"])
    steps = sorted({row["steps"] for row in r["rows"]})
    by = {(row["model"], row["steps"]): row for row in r["rows"]}
    table = [
        [model] + [" / ".join(f"{by[model, n][k]:.3g}" for k in keys) for n in steps]
        for model in models
    ]
    d = r["distillation"]
    head = [f"fd_train / P / R, N={r['num_samples']}"] + [f"{n} steps" for n in steps]
    return (
        _table(head, table)
        + f"\n\ndistillation: {d['train_steps']} steps, {d['train_seconds']:.0f} s, final loss "
        + f"{d['final_loss']:.3g}, grid of {len(d['grid'])} steps"
    )


def inpainting(r: dict) -> str:
    keys = ("class_accuracy", "mse_hidden", "fd_train", "precision", "recall")
    rows = [
        [row["mask"], row["method"], row.get("model_calls", "")] + [row[k] for k in keys]
        for row in r["inpainting"]
    ]
    head = ["hidden", "method", "model calls", "accuracy", "MSE (hidden half)", "fd_train"]
    out = [_table(head + ["precision", "recall"], rows)]
    skeys = ("l2_to_guide", "class_accuracy", "fd_train", "precision", "recall")
    g = r["sdedit_guides"]
    srows = [["guide itself", ""] + [g[k] for k in skeys]]
    srows += [[row["strength"], row["t0"]] + [row[k] for k in skeys] for row in r["sdedit"]]
    head = ["SDEdit strength", "t0", "RMS to guide", "accuracy", "fd_train", "precision"]
    out.append(_table(head + ["recall"], srows))
    return "\n\n".join(out)


def controlnet(r: dict) -> str:
    keys = ("l2_layout", "class_accuracy", "fd_test", "fd_train", "precision", "recall")

    def label(row):
        for k in ("strength", "scale"):
            if k in row:
                return f"{row['method']}, {k} {row[k]:g}"
        return row["method"]

    rows = [["guides themselves"] + [r["guides"][k] for k in keys]]
    rows += [[label(row)] + [row[k] for k in keys] for row in r["rows"]]
    head = ["method", "RMS to guide (pixelated)", "accuracy", "fd_test", "fd_train", "precision"]
    head.append("recall")
    t = r["training"]
    return (
        _table(head, rows)
        + f"\n\nControlNet: {t['train_steps']} steps, {t['train_seconds']:.0f} s, final loss "
        + f"{t['final_loss']:.3g}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results")
    args = p.parse_args(argv)
    for name, fn in (
        ("parameterization", parameterization),
        ("sampler_sweep", sampler_sweep),
        ("variance_loss", variance_loss),
        ("guidance", guidance),
        ("distillation", distillation),
        ("classifier_guidance", classifier_guidance),
        ("flow_matching", flow_matching),
        ("consistency", consistency),
        ("inpainting", inpainting),
        ("controlnet", controlnet),
    ):
        r = _load(args.out, name)
        if r is None:
            continue
        print(f"## {name}\n\n`{r['command']}` ({r['wall_seconds'] / 60:.1f} min)\n")
        print(fn(r))
        ref = r.get("reference", {}).get("fd_train_vs_test")
        if ref is not None:
            print(f"\nfd_train_vs_test (real train vs real test digits): {ref:.3g}\n")


if __name__ == "__main__":
    main()
