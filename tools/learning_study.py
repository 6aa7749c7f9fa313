"""The study of docs/learning.md: the quickstart recipe under named arms x seeds, at equal training wall time.

    python tools/learning_study.py --throughput --seeds 0 1 2 --data data --out runs/learning-study

An arm is a name and recipe overrides, `NAME=key=value,key=value` (commas inside [...] or {...} stay in the value),
or the name of a built-in arm (ARMS: baseline, multi-positive, augment, keywords, all-lines, slip, coca), so a new
setting slots in without code: `--arms baseline lr=train.lr=1e-3`. An arm may train another recipe than the
quickstart with the pseudo-override `recipe=PATH` (relative to the repository): the built-in `coca` arm is
`recipe=recipes/quickstart-coca.yaml` (the quickstart with a CoCa captioning decoder). Every run is (with the
arm's recipe file in place of the quickstart's)

    python -m clipkit.cli train recipes/quickstart.yaml data_root=DATA index.shards= eval.tasks=[...] [--set ...] \
        seed=S <arm overrides> train.steps=N train.warmup=W --out OUT/<arm>-s<seed>

with its log in OUT/logs/. The evaluation at its end is clipkit's own (`eval.tasks`, TASKS): emoji test retrieval
R@5 both ways (the quickstart's), emoji zero-shot over its 9 Unicode groups (the builder's classnames.txt and
templates.txt; json `label`), Fashion-MNIST zero-shot on the official test split, OpenClipart test retrieval R@5.

Equal wall time (`--throughput`): first each arm trains `--throughput-warmup` + `--throughput-steps` steps, the arms
one after another, in `--throughput-rounds` rounds (2; so a change of machine load falls on every arm); an arm's
samples/s is the best of its rounds over the steps after the warm-up (other jobs on the machine only ever slow a
round down, so the fastest round is the closest to the arm's own rate; a mean let one loaded round of the reference
hand every other arm 40% more steps). Each arm then trains
steps = round(reference steps * arm samples/s / reference arm samples/s) (the reference arm is `baseline`, else
the first; reference steps the recipe's 800), with the LR warmup scaled alike, so every arm gets the reference's
training time. Without `--throughput` every arm trains the recipe's steps; `--throughput-only` measures the rates,
prints the step plan and stops.

Resumable: a run whose summary.json holds its evals is not run again, and measured rates are kept in
OUT/throughput.json, so the study can be killed and restarted. `--jobs N` runs N trainings at once; with N > 1 each
gets one torch thread (`train.threads=1`, OMP_NUM_THREADS=1). Writes the JSON (`--json`, default
docs/bench/learning.json: commands, load, rates, steps, every run's metrics, mean and std per arm), the markdown
table (mean +- std over seeds, rounded from the JSON) into OUT/learning.md and between the markers of `--doc`
(default docs/learning.md), and a plot (`--plot`, default docs/images/learning.png).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipkit.config import RecipeError, load_recipe  # noqa: E402
from clipkit.files import atomic_path, write_json_atomic, write_text_atomic  # noqa: E402

RECIPE = ROOT / "recipes" / "quickstart.yaml"
ARMS = {  # name -> recipe overrides; what main offers today
    "baseline": [],
    # Fashion-MNIST json has "classname", emoji json has not: its samples stay their own positives. ("label" would
    # also merge every emoji of one Unicode group: the emoji builder's label is the group.)
    "multi-positive": ["train.positives=classname"],
    "augment": [  # mild: crops of half the image or more, brightness/contrast/saturation jitter, no hue change
        "data.augment.scale=[0.5, 1.0]",
        "data.augment.color_jitter=[0.2, 0.2, 0.2, 0.0]",
        "data.augment.color_jitter_prob=0.5",
    ],
    "keywords": ["data.caption=keywords"],
    "all-lines": ["data.caption=all"],
    "slip": ["train.slip.weight=1"],  # SimCLR on two views of every image, beside the contrastive loss
    "coca": ["recipe=recipes/quickstart-coca.yaml"],  # the same data, towers and evals, plus a captioning decoder
}
RECIPE_OVERRIDE = "recipe="  # an arm's pseudo-override naming the recipe file it trains
TASKS = {  # name -> (eval task of the recipe, the dataset folder it needs under --data)
    "emoji-retrieval": ({"task": "retrieval", "dataset": "emoji", "shards": "emoji/test-*.tar"}, "emoji"),
    "emoji-zeroshot": (
        {
            "task": "zeroshot",
            "dataset": "emoji",
            "shards": "emoji/test-*.tar",
            "classnames": "emoji/classnames.txt",
            "templates": "emoji/templates.txt",
        },  # fmt: skip
        "emoji",
    ),
    "fashion-mnist": (
        {
            "task": "zeroshot",
            "dataset": "fashion-mnist",
            "shards": "fashion-mnist/test-*.tar",
            "classnames": "fashion-mnist/classnames.txt",
            "templates": "fashion-mnist/templates.txt",
        },  # fmt: skip
        "fashion-mnist",
    ),
    "openclipart-retrieval": (
        {"task": "retrieval", "dataset": "openclipart", "shards": "openclipart/test-*.tar"},
        "openclipart",
    ),
}
SHOWN = (  # (summary key, column title)
    ("eval/emoji/image_retrieval_recall@5", "emoji text→image R@5"),
    ("eval/emoji/text_retrieval_recall@5", "emoji image→text R@5"),
    ("eval/emoji/acc1", "emoji zero-shot acc1 (9 groups)"),
    ("eval/fashion-mnist/acc1", "Fashion-MNIST zero-shot acc1"),
    ("eval/openclipart/image_retrieval_recall@5", "OpenClipart text→image R@5"),
    ("eval/openclipart/text_retrieval_recall@5", "OpenClipart image→text R@5"),
)
BEGIN, END = "<!-- learning-study:begin (tools/learning_study.py writes this block) -->", "<!-- learning-study:end -->"


def parse_arm(spec: str) -> tuple[str, list[str]]:
    """`NAME=key=value,key=value` (or a built-in NAME) -> (name, overrides); commas inside [] or {} are kept.

    Raises:
        ValueError: an unknown bare name, an empty name, or an override without `=`.
    """
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep:
        if name not in ARMS:
            raise ValueError(f"arm {spec!r}: not a built-in arm ({', '.join(ARMS)}); give NAME=key=value,...")
        return name, list(ARMS[name])
    if not name or "/" in name:
        raise ValueError(f"arm {spec!r}: needs a plain name before the first '='")
    overrides, depth, part = [], 0, ""
    for ch in rest:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            overrides.append(part.strip())
            part = ""
        else:
            part += ch
    overrides.append(part.strip())
    overrides = [o for o in overrides if o]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"arm {name!r}: {bad[0]!r} is not key=value")
    return name, overrides


def arm_recipe(overrides: list[str]) -> tuple[Path, list[str]]:
    """(the recipe file a run trains, its other overrides): `recipe=PATH` names the file (relative to the repository;
    the last one wins), else the quickstart."""
    recipe, rest = RECIPE, []
    for o in overrides:
        if o.startswith(RECIPE_OVERRIDE):
            path = Path(o[len(RECIPE_OVERRIDE) :].strip())
            recipe = path if path.is_absolute() else ROOT / path
        else:
            rest.append(o)
    return recipe, rest


def plan_steps(rates: dict[str, float], reference: str, steps: int, warmup: int) -> dict[str, dict]:
    """Equal time: each arm's steps = round(steps * rate / reference rate) (at least 2), LR warmup scaled alike."""
    plan = {}
    for arm, rate in rates.items():
        n = max(2, round(steps * rate / rates[reference]))
        plan[arm] = {"steps": n, "warmup": min(n - 1, round(warmup * n / steps))}
    return plan


def fixed_steps(plan: dict[str, dict], arms: dict[str, list[str]], steps: int, warmup: int) -> dict[str, dict]:
    """Arms whose overrides set `train.steps=N` train N steps (the LR warmup scaled alike), whatever the plan says."""
    plan = dict(plan)
    for arm, overrides in arms.items():
        for o in overrides:
            if o.startswith("train.steps="):
                n = int(o.split("=", 1)[1])
                plan[arm] = {"steps": n, "warmup": min(n - 1, round(warmup * n / steps)), "fixed": True}
    return plan


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


def cell(stat: dict | None, digits: int = 3) -> str:
    """ "mean ± std", or the value alone when one run gave it (a 0 spread would claim a certainty no one measured)."""
    if stat is None:
        return "–"
    if stat.get("n") == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def table(study: dict) -> str:
    """The markdown table of a study JSON: one row per arm, mean ± std over seeds of each metric (3 decimals)."""
    head = ["arm", "overrides", "seeds", "steps", "samples/s", "train wall time per run (min)", *(t for _, t in SHOWN)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, a in study["arms"].items():
        overrides = "<br>".join(f"`{o}`" for o in a["overrides"]) or "(quickstart)"
        rate = a.get("samples_per_s") or a["summary"]["samples_per_s"]["mean"]  # the throughput phase's, else the runs'
        train_min = a["summary"].get("train_s")
        train_min = {k: v / 60 if k != "n" else v for k, v in train_min.items()} if train_min else None
        row = [arm, overrides, str(a["summary"]["seeds"]), str(a["steps"]), f"{rate:.0f}" if rate else "–",
               cell(train_min, 1), *(cell(a["summary"].get(key)) for key, _ in SHOWN)]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def doc_block(study: dict, image: str | None = None) -> str:
    """Between the markers of docs/learning.md: conditions, table, plot (`image`: a relative path), command."""
    t = study.get("throughput")
    budget = (
        f"equal training time: steps scaled by each arm's samples/s against `{study['reference']}` "
        f"({study['reference_steps']} steps), rates measured alternately ({t['measured_steps']} steps after "
        f"{t['warmup_steps']}, {t.get('rounds', 2)} rounds, load average {t['load'][0]:.1f} at the start)"
        if t
        else f"equal steps ({study['reference_steps']})"
    )
    threads = "1 torch thread per run" if study["jobs"] > 1 else "the default thread policy"
    return (
        f"Measured {study['date']} on {study['machine']}: {budget}; {study['jobs']} run(s) at once, {threads}. "
        + (
            f"Mean ± std over seeds {', '.join(map(str, study['seeds']))}"
            if len(study["seeds"]) > 1
            else f"One run per arm (seed {study['seeds'][0]}): no seed spread measured"
        )
        + "; raw figures in docs/bench/learning.json.\n\n"
        + table(study)
        + (f"\n![Each metric per arm: a bar at the mean, a dot per seed]({image})\n" if image else "")
        + f"\nReproduce: `{study['command']}`\n"
    )


def fill_doc(doc: Path, block: str) -> None:
    """Replaces the text between BEGIN and END in `doc` with `block` (the markers stay)."""
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: the markers {BEGIN} and {END} are missing")
    head, rest = text.split(BEGIN, 1)
    write_text_atomic(doc, head + BEGIN + "\n" + block + END + rest.split(END, 1)[1])


def train(run_dir: Path, overrides: list[str], log: Path, threads: int) -> float:
    """One `clipkit train` of the quickstart (or `recipe=`) in a subprocess (this checkout's clipkit); wall seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    recipe, overrides = arm_recipe(overrides)
    cmd = [sys.executable, "-m", "clipkit.cli", "train", str(recipe), *overrides, "--out", str(run_dir)]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{run_dir.name}: clipkit train exited {done.returncode}; see {log}")
    return time.perf_counter() - start


def step_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def train_seconds(rows: list[dict], batch: int, after: int = 0) -> float:
    """Seconds the logged steps after step `after` took: each row's steps x batch / its samples/s."""
    total, last = 0.0, 0
    for r in rows:
        if last >= after:
            total += (r["step"] - last) * batch / r["samples_per_s"]
        last = r["step"]
    return total


def measure_throughput(args, arms: dict[str, list[str]], common: list[str], out: Path) -> dict:
    """Samples/s of every arm: warm-up + measured steps, arms alternating, in rounds; kept in OUT/throughput.json."""
    path = out / "throughput.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    keep = (saved.get("warmup_steps"), saved.get("measured_steps")) == (args.throughput_warmup, args.throughput_steps)
    keep = keep and saved.get("rounds", 2) <= args.throughput_rounds  # more rounds later: the first ones are kept
    found = saved.get("arms", {}) if keep else {}
    load = saved["load"] if keep and "load" in saved else list(os.getloadavg())
    result = {"warmup_steps": args.throughput_warmup, "measured_steps": args.throughput_steps,
              "rounds": args.throughput_rounds, "load": load, "arms": found}  # fmt: skip
    steps = args.throughput_warmup + args.throughput_steps
    for rnd in range(args.throughput_rounds):
        for arm, overrides in arms.items():
            done = found.setdefault(arm, {"overrides": overrides, "rounds": []})
            if done["overrides"] != overrides:  # the arm was redefined: its old rates say nothing
                done = found[arm] = {"overrides": overrides, "rounds": []}
            if len(done["rounds"]) > rnd:
                continue
            run_dir = out / "throughput" / f"{arm}-r{rnd}"
            shutil.rmtree(run_dir, ignore_errors=True)
            extra = [f"train.steps={steps}", "train.warmup=0", "train.log_every=1", "eval.tasks=[]"]
            train(run_dir, [*common, "seed=0", *overrides, *extra], out / "logs" / f"throughput-{arm}-r{rnd}.log",
                  args.threads)  # fmt: skip
            rows = step_rows(run_dir)
            seconds = train_seconds(rows, args.batches[arm], after=args.throughput_warmup)
            done["rounds"].append({"samples_per_s": args.throughput_steps * args.batches[arm] / seconds,
                                   "load": list(os.getloadavg())})  # fmt: skip
            done["samples_per_s"] = max(r["samples_per_s"] for r in done["rounds"])
            shutil.rmtree(run_dir, ignore_errors=True)
            write_json_atomic(path, result, sort_keys=False)
            print(f"throughput {arm} round {rnd}: {done['rounds'][-1]['samples_per_s']:.1f} samples/s", flush=True)
    for done in found.values():  # rates saved by an older version of this rule are taken again from their rounds
        done["samples_per_s"] = max(r["samples_per_s"] for r in done["rounds"])
    return result


def finished(run_dir: Path) -> dict | None:
    """The summary of a finished run (evals done, not preempted), else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if "eval" in summary and "preempted_at" not in summary else None


def run_one(args, arm: str, seed: int, overrides: list[str], plan: dict, common: list[str]) -> dict:
    """Trains and evaluates one (arm, seed) unless its summary.json is there; returns its record."""
    run_dir = args.out / f"{arm}-s{seed}"
    summary = finished(run_dir)
    if summary is not None and summary.get("steps") != plan["steps"]:
        summary = None  # planned for other steps (e.g. rates measured again): its results answer another question
    if summary is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # a run killed before its end restarts from scratch: honest times
        extra = [f"train.steps={plan['steps']}", f"train.warmup={plan['warmup']}"]
        wall = train(run_dir, [*common, f"seed={seed}", *overrides, *extra], args.out / "logs" / f"{arm}-s{seed}.log",
                     args.threads)  # fmt: skip
        write_json_atomic(run_dir / "study_run.json", {"wall_s": wall, "load_end": list(os.getloadavg())})
        summary = finished(run_dir)
        print(f"{arm} seed {seed}: {wall:.0f} s", flush=True)
    extra = json.loads((run_dir / "study_run.json").read_text()) if (run_dir / "study_run.json").is_file() else {}
    if summary["steps"] != plan["steps"]:
        print(f"warning: {run_dir} trained {summary['steps']} steps, the plan says {plan['steps']}", file=sys.stderr)
    rows = step_rows(run_dir)
    return {
        "arm": arm,
        "seed": seed,
        "steps": summary["steps"],
        "batch": summary["global_batch"],
        "wall_s": extra.get("wall_s"),
        "train_s": train_seconds(rows, args.batches[arm]),
        "load_end": extra.get("load_end"),
        "final_loss": summary["final_loss"],
        "metrics": {k: v for k, v in summary["eval"].items() if isinstance(v, float)},
    }


def summarize(runs: list[dict]) -> dict:
    out = {"seeds": len(runs), "wall_s": mean_std([r["wall_s"] for r in runs if r["wall_s"] is not None] or [0.0]),
           "train_s": mean_std([r["train_s"] for r in runs]),
           "samples_per_s": mean_std([r["steps"] * r["batch"] / r["train_s"] for r in runs])}  # fmt: skip
    for key, _ in SHOWN:
        values = [r["metrics"][key] for r in runs if key in r["metrics"]]
        if values:
            out[key] = mean_std(values)
    return out


def plot(study: dict, path: Path) -> None:
    """One panel per metric: a bar at each arm's mean and a dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(k, t) for k, t in SHOWN if any(k in r["metrics"] for r in study["runs"])]
    arms = list(study["arms"])
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], shown, strict=True):
        for x, arm in enumerate(arms):
            vals = [r["metrics"][key] for r in study["runs"] if r["arm"] == arm and key in r["metrics"]]
            if vals:
                ax.bar(x, statistics.mean(vals), color=f"C{x}", alpha=0.5)
                ax.scatter([x] * len(vals), vals, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), help="NAME=key=value,... or a built-in arm name")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", type=Path, default=Path("data"), help="folder holding emoji/, fashion-mnist/, ...")
    p.add_argument("--out", type=Path, default=Path("runs/learning-study"), help="run folders, logs, rates")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (> 1: one torch thread each)")
    p.add_argument("--throughput", action="store_true", help="equal wall time: measure samples/s, scale steps")
    p.add_argument("--throughput-only", action="store_true", help="measure the rates, print the step plan, stop")
    p.add_argument("--throughput-steps", type=int, default=30, help="measured steps per arm and round")
    p.add_argument("--throughput-warmup", type=int, default=10, help="steps before the measured ones")
    p.add_argument("--throughput-rounds", type=int, default=2, help="rounds over all arms (a rate: their best)")
    p.add_argument("--reference", help="the arm whose steps are the recipe's (default: baseline, else the first)")
    p.add_argument("--steps", type=int, help="the reference arm's steps (default: the recipe's train.steps)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="evaluations at the end")
    p.add_argument("--set", nargs="*", default=[], help="overrides for every arm (dotted.key=value), e.g. smoke tests")
    p.add_argument("--json", type=Path, default=ROOT / "docs/bench/learning.json")
    p.add_argument("--doc", type=Path, default=ROOT / "docs/learning.md", help="markdown page with the table markers")
    p.add_argument("--plot", type=Path, default=ROOT / "docs/images/learning.png")
    args = p.parse_args(argv)
    try:
        arms = dict(parse_arm(a) for a in args.arms)
    except ValueError as e:
        print(f"learning_study: {e}", file=sys.stderr)
        return 2
    if len(arms) != len(args.arms) or args.jobs < 1 or (args.steps is not None and args.steps < 2):
        print("learning_study: arm names must be unique, --jobs >= 1, --steps >= 2", file=sys.stderr)
        return 2
    reference = args.reference or ("baseline" if "baseline" in arms else next(iter(arms)))
    data = args.data.resolve()
    needed = {"emoji", "fashion-mnist", *(TASKS[t][1] for t in args.tasks)}  # training sources and eval sets
    missing = sorted(d for d in needed if not (data / d / "dataset.json").is_file())
    if missing:
        print(f"learning_study: {', '.join(str(data / d) for d in missing)} not built: "
              + "; ".join(f"clipkit data build {d} --out {data / d}" for d in missing), file=sys.stderr)  # fmt: skip
        return 2
    if reference not in arms:
        print(f"learning_study: --reference {reference!r} is not one of the arms {list(arms)}", file=sys.stderr)
        return 2
    args.threads = 1 if args.jobs > 1 else 0
    tasks = json.dumps([TASKS[t][0] for t in args.tasks])
    common = [f"data_root={data}", "index.shards=", f"eval.tasks={tasks}", *args.set]
    if args.threads:
        common.append("train.threads=1")
    recipes = {}
    for arm, overrides in arms.items():  # every arm's recipe is valid before anything runs
        recipe, rest = arm_recipe([*common, *overrides])
        try:
            if not recipe.is_file():
                raise RecipeError(f"recipe={recipe}: file not found")
            recipes[arm] = load_recipe(recipe, rest)
        except RecipeError as e:
            print(f"learning_study: arm {arm!r}: {e}", file=sys.stderr)
            return 2
    base = recipes[reference]
    args.batches = {arm: r.data.batch_size for arm, r in recipes.items()}
    steps = args.steps or base.train.steps
    warmup = round(base.train.warmup * steps / base.train.steps)
    args.out.mkdir(parents=True, exist_ok=True)

    throughput = measure_throughput(args, arms, common, args.out) if args.throughput or args.throughput_only else None
    if throughput:
        rates = {arm: throughput["arms"][arm]["samples_per_s"] for arm in arms}
        plan = plan_steps(rates, reference, steps, warmup)
    else:
        rates, plan = {}, {arm: {"steps": steps, "warmup": warmup} for arm in arms}
    plan = fixed_steps(plan, arms, steps, warmup)
    if args.throughput_only:
        for arm in arms:
            print(f"{arm}: {rates[arm]:.1f} samples/s -> {plan[arm]['steps']} steps (warmup {plan[arm]['warmup']})")
        return 0
    jobs = [(arm, seed) for seed in args.seeds for arm in arms]  # seed-major: a cut-short study has whole seeds
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = pool.map(lambda j: run_one(args, j[0], j[1], arms[j[0]], plan[j[0]], common), jobs)
        runs = list(tqdm(done, total=len(jobs), desc="learning study", unit="run"))

    study = {
        "command": shlex.join(["python", "tools/learning_study.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "recipe": str(RECIPE.relative_to(ROOT)),
        "common_overrides": common,
        "jobs": args.jobs,
        "threads_per_run": "1 (train.threads=1, OMP_NUM_THREADS=1)" if args.threads else "clipkit's policy",
        "seeds": args.seeds,
        "reference": reference,
        "reference_steps": steps,
        "tasks": args.tasks,
        "throughput": throughput,
        "load_end": list(os.getloadavg()),
        "arms": {
            arm: {
                "overrides": o,
                "samples_per_s": rates.get(arm),
                **plan[arm],
                "summary": summarize([r for r in runs if r["arm"] == arm]),
            }  # fmt: skip
            for arm, o in arms.items()
        },
        "runs": runs,
    }
    write_json_atomic(args.json, study, sort_keys=False)
    plot(study, args.plot)
    write_text_atomic(args.out / "learning.md", doc_block(study, str(args.plot.resolve())))
    block = doc_block(study, os.path.relpath(args.plot.resolve(), args.doc.resolve().parent))
    fill_doc(args.doc, block)
    print(block)
    return 0


def machine() -> str:
    """ "<cores> cores, <CPU model>" (Linux), for the table's conditions."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")] \
        if cpuinfo.is_file() else []  # fmt: skip
    return f"{os.cpu_count()} cores" + (f", {models[0]}" if models else "")


if __name__ == "__main__":
    sys.exit(main())
