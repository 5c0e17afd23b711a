"""`capt compare`: the table (pure) and one small end-to-end run through Ray Tune and MLflow."""

import csv
import io
import json

import pytest

from pipeline.compare import load_compare
from pipeline.compare_table import aggregate, cross_average, honesty_problems, mean_std, to_csv, to_markdown
from pipeline.config import ConfigError


def _cell(method, seed, clean, pgd, aa, protocol="few_shot"):
    return {"method": method, "protocol": protocol, "seed": seed, "run_id": f"r{method}{seed}",
            "metrics": {"clean_acc": clean, "pgd100_acc": pgd, "autoattack_acc": aa,
                        "xd_a_clean_acc": 0.5, "xd_b_clean_acc": 0.7}}


def test_mean_std_by_hand():
    assert mean_std([0.5]) == (0.5, 0.0)
    m, s = mean_std([0.2, 0.4, 0.6])
    assert m == pytest.approx(0.4) and s == pytest.approx(0.2)


def test_table_rows_and_formats():
    cells = [_cell("capt", 0, 0.9, 0.5, 0.4), _cell("capt", 1, 0.8, 0.3, 0.2), _cell("apt", 0, 0.7, 0.2, 0.1)]
    rows = aggregate(cells, ["apt", "capt"])
    capt = rows[1]
    assert capt["clean"][:2] == pytest.approx((0.85, 0.0707106), rel=1e-4) and capt["clean"][2] == 2
    assert capt["cross clean"][0] == pytest.approx(0.6)
    md = to_markdown(rows)
    assert "| capt | 85.0 ± 7.1 | 40.0 ± 14.1 | 30.0 ± 14.1 |" in md
    table = list(csv.reader(io.StringIO(to_csv(rows))))
    assert table[0][0] == "method" and table[2][0] == "capt" and float(table[2][1]) == pytest.approx(0.85)


def test_cross_average_and_honesty():
    assert cross_average({"xd_a_pgd100_acc": 0.2, "xd_b_pgd100_acc": 0.4})["xd_pgd100_acc"] == pytest.approx(0.3)
    bad = [_cell("capt", 0, 0.5, 0.6, 0.4), _cell("fap", 0, 0.9, 0.3, 0.4)]
    problems = honesty_problems(bad)
    assert any("capt" in p and "PGD-100" in p for p in problems)
    assert any("fap" in p and "AutoAttack" in p for p in problems)
    assert honesty_problems([_cell("ok", 0, 0.9, 0.5, 0.4)]) == []


def test_honesty_on_the_autoattack_subset():
    """AutoAttack on a subset is held against PGD-100 on the same images, not on the whole set."""
    cell = _cell("capt", 0, 0.9, 0.5, 0.45)
    cell["metrics"].update({"clean-aasub_acc": 0.9, "pgd100-aasub_acc": 0.4})  # AA 0.45 > PGD-100 0.4 there
    problems = honesty_problems([cell])
    assert len(problems) == 1 and "AutoAttack 0.450 > PGD-100 0.400 on the AutoAttack subset" in problems[0]
    cell["metrics"]["pgd100-aasub_acc"] = 0.5
    assert honesty_problems([cell]) == []


def test_protocol_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("base: {eval: {final_attacks: [pgd100, autoattack]}}\n"
                 "methods: {zeroshot: {}, capt: {eval: {final_attacks: [pgd10, pgd100]}}}\n"
                 "protocols: {few_shot: {}, base_to_new: {eval: {final_attacks: [pgd100]}}}\n")
    cells = {(c["method"], c["protocol"]): c["config"] for c in load_compare(f, [])["cells"]}
    assert cells["zeroshot", "few_shot"]["eval"]["final_attacks"] == ["pgd100", "autoattack"]
    assert cells["zeroshot", "base_to_new"]["eval"]["final_attacks"] == ["pgd100"]
    assert cells["zeroshot", "base_to_new"]["data"]["classes"] == "base"
    assert cells["capt", "base_to_new"]["eval"]["final_attacks"] == ["pgd10", "pgd100"]  # the method's override wins
    f.write_text("methods: {capt: {}}\nprotocols: {base_to_new: [1]}\n")
    with pytest.raises(ConfigError, match="protocols.base_to_new"):
        load_compare(f, [])


def test_compare_file_validation(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("methods: {capt: {loss: {lamda: 1}}}\n")
    with pytest.raises(ConfigError, match="methods.capt: unknown config key: loss.lamda"):
        load_compare(f, [])
    f.write_text("methods: {capt: {}}\nprotocols: [few_shots]\n")
    with pytest.raises(ConfigError, match="few_shots"):
        load_compare(f, [])
    f.write_text("methods: {}\n")
    with pytest.raises(ConfigError, match="methods"):
        load_compare(f, [])


def test_shipped_compare_files_resolve():
    for name in ("fap_protocol", "apt_protocol"):
        plan = load_compare(f"configs/compare/{name}.yaml", [])
        assert {c["method"] for c in plan["cells"]} >= {"zeroshot", "advvlp", "capt"}


def test_compare_end_to_end(tmp_path, monkeypatch, capsys):
    """Two methods, one seed, few-shot + base-to-new, TAPT on top: through a real local Ray and MLflow."""
    from mlflow import MlflowClient

    from pipeline.cli import main
    from pipeline.data.sources import shards_from_digits

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    data = tmp_path / "digits"
    shards_from_digits(data, progress=False)
    f = tmp_path / "mini.yaml"
    f.write_text(f"""
base:
  model: {{name: capt-tiny}}
  data: {{path: {data}, shots: 2, test_limit: 16, cross_datasets: [{data}]}}
  attack: {{eps: 8.0}}
  optim: {{epochs: 1, batch_size: 10}}
  eval: {{attack: none, final_attacks: [pgd10], batch_size: 16}}
methods: {{zeroshot: {{}}, capt: {{prompt: {{depth: 2}}}}}}
seeds: [0]
protocols: [few_shot, base_to_new]
tapt: {{method: best, views: 4, tau: 0.5, layers: [0, 1], attack_steps: 10, adaptive_steps: 1, limit: 6}}
checks: {{steps: {{methods: [capt, best], attacks: [pgd10, pgd20], eps: [4.0, 8.0], limit: 5}}}}
compare: {{name: mini, table_attack: pgd10, resources: {{cpu: 1, gpu: 0}}, max_concurrent: 2}}
""")
    out = tmp_path / "out"
    assert main(["compare", "--config", str(f), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cells = summary["cells"]
    assert {(c["method"], c["protocol"]) for c in cells} == {
        ("zeroshot", "few_shot"), ("zeroshot", "base_to_new"), ("capt", "few_shot"), ("capt", "base_to_new"),
        ("capt+tapt", "few_shot")}
    few = next(c for c in cells if c["method"] == "capt" and c["protocol"] == "few_shot")["metrics"]
    assert few["pgd10_acc"] <= few["clean_acc"] and "xd_digits_clean_acc" in few and few["train_seconds"] > 0
    b2n = next(c for c in cells if c["method"] == "capt" and c["protocol"] == "base_to_new")["metrics"]
    assert {"base_clean_acc", "new_clean_acc", "hm_clean_acc"} <= set(b2n)
    tapt = next(c for c in cells if c["method"] == "capt+tapt")["metrics"]
    assert tapt["tapt_images"] == 6 and "pgd10_acc" in tapt  # TAPT's transfer attack fills the table's column
    checks = {c["method"]: c["metrics"] for c in summary["checks"]}
    assert set(checks) == {"capt", "zeroshot"}  # `best`: the only peer of the reference
    for m in checks.values():
        assert m["check_images"] == 5 and {"pgd10_acc", "pgd20_acc", "pgd10_acc_eps4", "pgd20_acc_eps4"} <= set(m)
    assert checks["capt"]["clean_acc"] == pytest.approx(round(5 * checks["capt"]["clean_acc"]) / 5)  # on 5 images
    table = (out / "table.md").read_text()
    assert "| capt+tapt |" in table and "| zeroshot |" in table and "PGD-10" in table and "PGD-100" not in table
    assert "steps (seed 0, 5 test images)" in table and "over 5 cells and 2 checks" in table
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mini")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 5 + 2 and all(r.info.status == "FINISHED" for r in children)  # 5 cells, 2 checks
    ids = {c["run_id"] for c in cells + summary["checks"]}
    assert ids == {r.info.run_id for r in children}  # every cell and check links to its MLflow run
    assert "table:" in capsys.readouterr().out
