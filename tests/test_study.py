"""study.py: `python study.py --quick` runs the whole pipeline, and its numbers are what they claim to be."""

import json
import random
import re
import subprocess
import sys
from collections import Counter
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import study
import train
from model import GPT, GPTConfig
from test_plot import assert_real_image

ROOT = train.Path(train.__file__).parent


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick study (2 seeds, a base and a reference each, 15 methods, a tiny model, 10 continual steps), run as a
    user runs it."""
    out = tmp_path_factory.mktemp("study")
    p = subprocess.run([sys.executable, str(ROOT / "study.py"), "--quick", "--out_dir", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_run_of_every_seed_is_reported(quick):
    out, res = quick
    names = [name for name, _ in res["methods"]]
    assert len(names) == 15 and names[0] == "ERM"
    assert {"linupper tau 0.3", "quadratic tau 0.3", "extremes tau 0.3", "random 8 of 16 (same pool)",
            "RHO-LOSS keep 0.5", "excess IR-DRO tau 1"} <= set(names)
    assert sorted(res["base"]) == sorted(res["reference"]) == sorted(res["runs"]) == ["1", "2"]
    for r in res["reference"].values():
        assert np.isfinite([r["val_clean"], r["val_hard"]]).all()
    for seed in res["runs"]:
        assert sorted(res["runs"][seed]) == sorted(names)
        for name in names:
            r = res["runs"][seed][name]
            assert np.isfinite([r["val_clean"], r["val_hard"]]).all()
            assert len(records(out / f"seed{seed}" / res["run_dirs"][name] / "weights.jsonl")) == res["args"]["iters"]
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in names + ["base model (no continual training)"])
    assert "wall time" in table and "python study.py --quick" in table
    assert "| on noise | on corrupt |" in table and "| clean | hard | noise | corrupt |" in table
    ref = {k: study.mean_std([r[f"val_{k}"] for r in res["reference"].values()]) for k in ("clean", "hard")}
    assert (f"on the {len(res['reference_data']['train'])} held-out clean training scenes" in table
            and f"val loss clean {study.pm(ref['clean'])}, hard {study.pm(ref['hard'])}." in table)


def group_of(out):
    """The group of every mix document id, read from its title (titles.json), not from groups.json."""
    titles = json.loads((out / "data" / "mix" / "titles.json").read_text())
    return [t.split(":")[0] for t in titles]


def test_weight_shares_are_recounted_from_weights_jsonl(quick):
    out, res = quick
    groups = group_of(out)
    assert json.loads((out / "data" / "mix" / "groups.json").read_text()) == groups
    assert set(groups) == {"clean", "hard", "noise", "corrupt"} == set(study.GROUPS)
    for seed, runs in res["runs"].items():
        for name, r in runs.items():
            weight, seen = Counter(), Counter()
            for rec in records(out / f"seed{seed}" / res["run_dirs"][name] / "weights.jsonl"):
                assert sum(rec["weight"]) == pytest.approx(1, abs=1e-5)
                for d, w in zip(rec["doc"], rec["weight"]):
                    weight[groups[d]] += w
                    seen[groups[d]] += 1
            total_w, total_n = sum(weight.values()), sum(seen.values())
            assert sum(r["share"].values()) == pytest.approx(1) and len(r["share"]) == 4
            for g in study.GROUPS:
                assert r["share"][g] == pytest.approx(weight[g] / total_w)
                assert r["seen"][g] == pytest.approx(seen[g] / total_n)
        # ERM's weights are uniform, so its shares are the shares of the samples it saw
        assert runs["ERM"]["share"] == pytest.approx(runs["ERM"]["seen"])


def test_noise_is_the_hardest_group_and_hard_sample_methods_weight_it_more(quick):
    """Character-shuffled text has the highest loss, so the methods that favour high losses give it more
    than ERM's share, and MidRanking's skip gives it less than hardest-only (which skips nothing)."""
    _, res = quick
    for runs in res["runs"].values():
        erm = runs["ERM"]
        assert erm["group_loss"]["noise"] > max(erm["group_loss"]["clean"], erm["group_loss"]["hard"])
        noise = {name: r["share"]["noise"] for name, r in runs.items()}
        assert noise["hardest half (skip 0, keep 0.5)"] >= noise["ERM"]
        assert noise["MidRanking skip 0.25 keep 0.5"] < noise["hardest half (skip 0, keep 0.5)"]
        assert noise["IR-DRO tau 1"] >= noise["IR-DRO tau 3"] >= noise["IR-DRO tau 10"] >= noise["ERM"] - 1e-9


def test_same_data_order_for_every_method_of_a_seed(quick):
    """Every run, the random control included, sees identical batches of n samples at every step."""
    out, res = quick
    n = res["args"]["batch_size"]
    for seed in res["runs"]:
        docs = {name: [r["doc"] for r in records(out / f"seed{seed}" / d / "weights.jsonl")]
                for name, d in res["run_dirs"].items()}
        assert all(d == docs["ERM"] for d in docs.values()) and len(docs["ERM"][0]) == n
    erm = res["run_dirs"]["ERM"]  # and the seed changes the order
    assert records(out / "seed1" / erm / "weights.jsonl")[0]["doc"] != records(out / "seed2" / erm / "weights.jsonl")[0]["doc"]


def test_random_control_keeps_half_of_each_pool_regardless_of_loss(quick):
    """n/2 samples of each step's pool at 1/(n/2) each, the rest 0; which ones does not follow the loss: about
    half of the kept ones are in the pool's top half by loss (MidRanking's are chosen by rank)."""
    out, res = quick
    k = res["args"]["batch_size"] // 2
    for seed in res["runs"]:
        top = kept = 0
        for rec in records(out / f"seed{seed}" / res["run_dirs"]["random 8 of 16 (same pool)"] / "weights.jsonl"):
            w, loss = np.array(rec["weight"]), np.array(rec["loss"])
            assert sorted(w) == pytest.approx([0.0] * (len(w) - k) + [1 / k] * k)
            top += (loss[w > 0] >= np.median(loss)).sum()
            kept += k
        assert 0.25 < top / kept < 0.75


def test_held_out_documents_are_never_trained_on(quick):
    out, _ = quick
    data = out / "data"

    def titles(name, split):
        every = json.loads((data / name / "titles.json").read_text())
        return {every[i] for i in np.load(data / name / f"{split}_docs.npz")["ids"]}

    mix = {re.sub(r" \((words )?shuffled\)$", "", t.split(": ", 1)[1])  # the source of a noise or corrupt copy
           for t in titles("mix", "train") | titles("mix", "val")}
    assert not mix & titles("clean", "val") and not mix & titles("hard", "val")
    assert mix >= titles("hard", "train")  # every Milton training section is in the mix
    # the base model trained on clean scenes only
    assert json.loads((out / "seed1" / "base" / "args.json").read_text())["segments"][0]["args"]["data"] == str(data / "clean")


def test_reference_data_is_the_clean_training_scenes_the_mix_does_not_use(quick):
    """The reference's scenes, the mix's documents (and the sources of its noise and corrupt copies) and both val
    sets are pairwise disjoint; together with the mix's clean and corrupt sources, the reference's scenes (and the
    one in its unused val split) are all the clean training scenes."""
    out, res = quick
    data = out / "data"

    def titles(name, split):
        every = json.loads((data / name / "titles.json").read_text())
        return {every[i] for i in np.load(data / name / f"{split}_docs.npz")["ids"]}

    mix = {re.sub(r" \((words )?shuffled\)$", "", t.split(": ", 1)[1]) for t in titles("mix", "train") | titles("mix", "val")}
    ref, unused = titles("reference", "train"), titles("reference", "val")
    assert ref and len(unused) == 1 and not ref & unused
    assert not (ref | unused) & mix and not (ref | unused) & titles("clean", "val") and not (ref | unused) & titles("hard", "val")
    assert ref | unused | (mix & titles("clean", "train")) == titles("clean", "train")
    scenes = json.loads((data / "reference" / "scenes.json").read_text())  # the clean corpus's ids of those scenes
    clean_titles = json.loads((data / "clean" / "titles.json").read_text())
    assert {clean_titles[i] for i in scenes["train"]} == ref and {clean_titles[i] for i in scenes["unused_val"]} == unused
    assert res["reference_data"] == dict(scenes, steps=res["args"]["iters"], lr=res["args"]["lr"])
    for seed in res["reference"]:  # the seed's base continued with ERM on them, as many steps as a continual run
        seg = json.loads((out / f"seed{seed}" / "reference" / "args.json").read_text())["segments"][0]["args"]
        assert (seg["data"], seg["init_from"], seg["method"]) == (str(data / "reference"), str(out / f"seed{seed}" / "base"), "erm")
        assert len(records(out / f"seed{seed}" / "reference" / "weights.jsonl")) == res["args"]["iters"]


def test_runs_against_the_reference_weigh_the_reducible_loss_of_their_seeds_reference(quick):
    """RHO-LOSS keeps the half of each pool with the largest loss - ref_loss; excess IR-DRO is softmax((l - l_ref) / 1).
    Both read the reference of their own seed; the other methods read none."""
    out, res = quick
    k = res["args"]["batch_size"] // 2
    for seed in res["runs"]:
        for name, d in res["run_dirs"].items():
            seg = json.loads((out / f"seed{seed}" / d / "args.json").read_text())["segments"][0]["args"]
            against = seg["method"] in ("rholoss", "excess_irdro")
            assert seg["ref_model"] == (str(out / f"seed{seed}" / "reference") if against else None)
            for rec in records(out / f"seed{seed}" / d / "weights.jsonl"):
                assert ("ref_loss" in rec) == against
                if not against:
                    continue
                excess, w = np.subtract(rec["loss"], rec["ref_loss"]), np.array(rec["weight"])
                if seg["method"] == "rholoss":
                    assert sorted(w) == pytest.approx([0.0] * (len(w) - k) + [1 / k] * k)
                    assert excess[w > 0].min() >= excess[w == 0].max()
                else:
                    assert w == pytest.approx(np.exp(excess) / np.exp(excess).sum(), rel=1e-4)


def test_noise_documents_are_shuffled_real_documents(quick):
    out, _ = quick
    docs = [json.loads(line) for line in (out / "data" / "mix.jsonl").read_text().splitlines()]
    real = {r["title"].split(": ", 1)[1]: r["text"] for r in docs if not r["title"].startswith("noise")}
    noise = [r for r in docs if r["title"].startswith("noise")]
    assert len(noise) == round(sum(r["title"].startswith("hard") for r in docs) * 0.15 / 0.3)  # --mix .4 .3 .15 .15
    for r in noise:
        source = real[r["title"].split(": ", 1)[1].removesuffix(" (shuffled)")]
        assert sorted(r["text"]) == sorted(source) and r["text"] != source


def test_corrupt_documents_are_clean_scenes_with_a_fraction_of_their_words_moved(quick):
    out, res = quick
    docs = [json.loads(line) for line in (out / "data" / "mix.jsonl").read_text().splitlines()]
    scenes = {r["title"]: r["text"] for r in study.prepare_data.read_jsonl_gz(study.CLEAN_CORPUS)}
    clean_val = set(json.loads((out / "data" / "clean" / "titles.json").read_text())[i]
                    for i in np.load(out / "data" / "clean" / "val_docs.npz")["ids"])
    corrupt = [r for r in docs if r["title"].startswith("corrupt: ")]
    assert len(corrupt) == round(sum(r["title"].startswith("hard") for r in docs) * 0.15 / 0.3)
    fraction = res["args"]["corrupt_words"]
    for r in corrupt:
        title = r["title"].removeprefix("corrupt: ").removesuffix(" (words shuffled)")
        assert title in scenes and title not in clean_val  # a clean training scene
        source = scenes[title]
        assert re.findall(r"\s+", r["text"]) == re.findall(r"\s+", source)  # every space and line break kept
        words, original = r["text"].split(), source.split()
        assert sorted(words) == sorted(original)  # the same words, spelt right
        moved = sum(a != b for a, b in zip(words, original))
        assert 0.8 * fraction * len(original) < moved <= round(fraction * len(original))


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_corrupted_moves_that_fraction_of_the_words(fraction):
    text = "  ".join(f"w{i}\n" for i in range(40)) + "end"  # distinct words: a moved word is a changed position
    out = study.corrupted(text, fraction, random.Random(0))
    assert re.findall(r"\s+", out) == re.findall(r"\s+", text) and sorted(out.split()) == sorted(text.split())
    moved = sum(a != b for a, b in zip(out.split(), text.split()))
    assert round(0.7 * fraction * 41) <= moved <= round(fraction * 41)


@pytest.mark.parametrize("run", ["base", "reference"])
def test_base_and_reference_losses_are_their_checkpoints_evaluated_directly(quick, run):
    out, res = quick
    args = res["args"]
    for seed in res[run]:
        ckpt = torch.load(out / f"seed{seed}" / run / "ckpt.pt", weights_only=False)
        assert ckpt["step"] == args["base_iters" if run == "base" else "iters"]
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        for name in ("clean", "hard"):
            val = train.load_split(out / "data" / name, "val", args["block_size"])
            samples = np.sort(np.random.default_rng(0).permutation(len(val["start"]))[:args["eval_samples"]])
            loss = train.evaluate(model, val, samples, 8, args["block_size"], torch.device("cpu"), nullcontext())
            assert res[run][seed][f"val_{name}"] == pytest.approx(loss, rel=1e-5)


def test_table_numbers_are_the_mean_and_std_of_the_seeds(quick):
    out, res = quick
    rows = {r["method"]: r for r in study.summarize(res)}
    erm = [res["runs"][s]["ERM"]["val_hard"] for s in ("1", "2")]
    irdro = [res["runs"][s]["IR-DRO tau 1"]["val_hard"] for s in ("1", "2")]
    assert rows["ERM"]["val_hard"] == pytest.approx((np.mean(erm), np.std(erm, ddof=1)))
    diff = np.subtract(irdro, erm)
    assert rows["IR-DRO tau 1"]["delta_val_hard"] == pytest.approx((diff.mean(), diff.std(ddof=1)))
    assert f"| IR-DRO tau 1 | {study.pm(rows['IR-DRO tau 1']['val_clean'])} |" in (out / "results.md").read_text()


def test_figure_is_a_real_image(quick):
    out, _ = quick
    assert_real_image(out / "study.png")


@pytest.mark.parametrize("flags", [["--mix", "0", "0.5", "0.25", "0.25"], ["--mix", "0.5", "0.3", "-0.1", "0.3"],
                                   ["--mix", "0.5", "0.3", "0.2"],
                                   ["--corrupt_words", "0"], ["--corrupt_words", "1.5"]])
def test_bad_mix_is_one_line_and_exit_code_2(tmp_path, flags):
    p = subprocess.run([sys.executable, str(ROOT / "study.py"), "--quick", *flags, "--out_dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and flags[0] in p.stderr and not list(tmp_path.iterdir())
    assert len(p.stderr.strip().splitlines()) == 1


def test_mix_asking_for_more_clean_scenes_than_there_are_is_one_line_and_exit_code_2(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "study.py"), "--quick", "--mix", "0.9", "0.1", "0", "0",
                        "--out_dir", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and "--mix asks for 450 clean scenes" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_mix_leaving_no_clean_scene_for_the_reference_is_one_line_and_exit_code_2(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "study.py"), "--quick", "--mix", "0.532", "0.2", "0", "0",
                        "--out_dir", str(tmp_path)], capture_output=True, text=True)  # 133 clean scenes of 133
    assert p.returncode == 2 and "--mix leaves 0 of the 133 clean training scenes" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_mix_of_four_shares_sets_the_group_sizes(tmp_path):
    """--mix CLEAN HARD NOISE CORRUPT: each group's count of documents is hard's times its share / hard's."""
    clean, hard, mixed, _ = study.prepare(tmp_path, [0.6, 0.3, 0.0, 0.3], 0.5)
    groups = Counter(json.loads((mixed / "groups.json").read_text()))
    assert groups["noise"] == 0 and groups["corrupt"] == groups["hard"] == 50 and groups["clean"] == 100
