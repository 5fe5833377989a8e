"""The report: data extraction (no plotting, no browser), escaping, the page and the CLI verb."""
from __future__ import annotations

import base64
import gzip
import json
import re

import pytest
from report_run import (BLOCKS, BLOCK_PARAMS, FRONTIER_ROWS, block_kl, build_run, make_profile, make_schedule,
                        unit_name)

from plotly.offline import get_plotlyjs

from autocompress.cli import main
from autocompress.errors import UserError
from autocompress.profile.artifact import UnitProfile
from autocompress.report import data, load_run, write_report
from autocompress.report.html import script_json
from autocompress.search.result import SearchResult

EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


def test_load_run_reads_every_artifact(run):
    assert run.missing == {}
    assert run.profile.model == "tiny-llama" and len(run.search.trials) == 12
    assert run.schedule.units[unit_name(3)].drop
    assert run.evaluation["perplexity"] == 24.0 and run.original["perplexity"] == 16.0
    assert len(run.staged["steps"]) == 3


def test_load_run_names_missing_and_broken_artifacts(tmp_path):
    (tmp_path / "profile.json").write_text("{not json")
    run = load_run(tmp_path)
    assert run.profile is None and run.search is None
    assert "could not be read" in run.missing["profile.json"] and "not valid JSON" in run.missing["profile.json"]
    assert run.missing["search.json"] == f"no search.json in {tmp_path}"
    assert set(run.missing) == {"profile.json", "search.json", "schedule.json", "eval.json", "eval_original.json",
                                "staged.json"}
    with pytest.raises(UserError, match="not a run directory"):
        load_run(tmp_path / "nowhere")


def test_eval_json_inside_the_model_dir_is_found(tmp_path, run_dir):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "eval.json").write_bytes((run_dir / "eval.json").read_bytes())
    assert load_run(tmp_path).evaluation["perplexity"] == 24.0


def test_sensitivity_matrix_is_in_model_order_with_measured_values():
    profile = make_profile()
    profile.units.append(UnitProfile(name="model.layers.10", block=10, kl={"bits=2": 3.0}))
    info = data.sensitivity_info(profile)
    assert info.units == [unit_name(i) for i in range(BLOCKS)] + ["model.layers.10"]  # 10 after 5, not after 1
    assert info.labels[:3] == ["bits=2", "bits=3", "bits=4"]
    assert info.kl[0][info.labels.index("drop")] == pytest.approx(block_kl(0, "drop"))
    assert info.kl[-1][0] == 3.0 and info.kl[-1][1] is None  # unmeasured stays None


def test_additivity_and_proxy_tables():
    profile = make_profile()
    profile.proxy_spearman = {"fisher ~ bits=2": 0.8, "fisher ~ drop": 0.2, "weight_kurtosis ~ bits=2": -0.9,
                              "activation_norm ~ drop": 0.1}
    assert data.additivity_rows(profile) == [("bits=3", "0.3", "0.5", "1.67")]
    header, rows = data.proxy_table(profile)
    assert header == ["proxy", "bits=2", "drop"]
    assert rows == [["weight_kurtosis", "-0.9", "-"], ["fisher", "0.8", "0.2"], ["activation_norm", "-", "0.1"]]
    profile.proxy_spearman = {"fisher": 0.5}
    assert data.proxy_table(profile) == (["proxy", "all"], [["fisher", "0.5"]])


def test_numbers_are_right_aligned_in_tables():
    from autocompress.report.html import table_html

    page = table_html(["a"], [["6.775e-07"], ["1,024"], ["+12.5%"], ["3.4 KiB"], ["-"], ["bits=2"], ["0.1 apples"]])
    assert page.count('class="num"') == 5


def test_role_curves_from_profile_and_rebuilt_from_units():
    profile = make_profile()
    info = data.role_curve_info(profile)
    assert info.layers == list(range(BLOCKS + 1)) and set(info.curves) == {"lexical", "word_class", "nesting"}
    assert info.dominant[0] == (0, "lexical") and len(info.dominant) == BLOCKS
    assert data.dominant_groups(info) == [("lexical", "0, 3"), ("word_class", "1, 4"), ("nesting", "2, 5")]
    info.dominant = [(0, "a"), (1, "a"), (2, "a"), (3, "b"), (4, "a"), (6, "a"), (7, "a")]
    assert data.dominant_groups(info) == [("a", "0-2, 4, 6-7"), ("b", "3")]
    profile.role_curves = {}
    rebuilt = data.role_curve_info(profile)
    assert rebuilt.curves["nesting"][0] is None  # no embeddings layer without curves
    assert rebuilt.curves["nesting"][1:] == pytest.approx([0.3 + 0.05 * i for i in range(BLOCKS)])


def test_schedule_info_labels_additive_kl_and_average_bits():
    profile = make_profile()
    info = data.schedule_info(make_schedule(profile), profile)
    assert info.units == [unit_name(i) for i in range(BLOCKS)]
    assert info.labels == ["bits=4", "bits=3 + 2:4", "bits=2 + heads=0.25", "drop", "bits=3", "bits=8"]
    assert info.bits == [4, 3, 2, 0, 3, 8] and info.drop == [False, False, False, True, False, False]
    assert info.chosen_kl[1] == pytest.approx(block_kl(1, "bits=3") + block_kl(1, "2:4"))
    assert info.chosen_kl[3] == pytest.approx(block_kl(3, "drop"))
    assert info.worst_kl[0] == pytest.approx(block_kl(0, "drop"))
    assert info.average_bits == pytest.approx((4 + 3 + 2 + 3 + 8) / 5)  # the dropped block is not averaged
    assert data.schedule_info(make_schedule(profile), None).chosen_kl == [None] * BLOCKS


def test_pareto_front_keeps_only_non_dominated_feasible_points():
    def point(memory, quality, feasible=True):
        return data.TrialPoint(None, "t", memory, None, quality, None, None, feasible=feasible)

    points = [point(10, 5.0), point(20, 3.0), point(15, 6.0), point(30, 3.5), point(5, 1.0, feasible=False),
              point(40, 1.0)]
    front = data.pareto_front(points)
    assert [(p.memory, p.quality) for p in front] == [(10, 5.0), (20, 3.0), (40, 1.0)]


def test_pareto_info_uses_measured_then_corrected_then_predicted(run):
    info = data.pareto_info(run.search)
    by_number = {t.number: t for t in info.trials}
    assert by_number[2].quality == pytest.approx(by_number[2].measured)
    assert by_number[5].measured is None and by_number[5].quality == pytest.approx(by_number[5].corrected)
    assert by_number[3].quality == pytest.approx(by_number[3].predicted)
    assert info.best.number == run.search.best and [p.number for p in info.search_pareto] == [run.search.best]
    assert info.budget_memory == run.search.budget["limits"]["memory_bytes"]
    assert [b.source for b in info.baselines] == ["uniform:bits=3", "knapsack"]
    assert info.baselines[1].number == 1 and info.baselines[1].measured is None


def test_history_best_so_far_counts_feasible_trials_only(run):
    info = data.history_info(run.search)
    assert info.numbers == list(range(12))
    feasible = {t.number: t.feasible for t in run.search.trials}
    best = float("inf")
    for number, value, so_far in zip(info.numbers, info.values, info.best_so_far):
        if feasible[number]:
            best = min(best, value)
        assert so_far == pytest.approx(best if best < float("inf") else value)


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    xs, ys = [1.0, 2.0, 2.0, 5.0, 3.0, 9.0], [0.3, 0.1, 0.4, 0.8, 0.8, 0.7]
    assert data.spearman(xs, ys) == pytest.approx(spearmanr(xs, ys).statistic)
    assert data.spearman([1.0, 2.0], [2.0, 1.0]) is None and data.spearman([1, 1, 1], [1, 2, 3]) is None


def test_prediction_info_pairs_measured_trials(run):
    info = data.prediction_info(run.search)
    assert [p.number for p in info.points] == [0, 2, 4, 6, 8, 10]
    assert info.median_ratio == pytest.approx(1.5)  # the fixture measures 1.5x the prediction
    assert info.spearman_additive == pytest.approx(1.0) and info.spearman_corrected == pytest.approx(1.0)


def test_study_location_resolves_a_relative_sqlite_url(run, tmp_path):
    storage, name = data.study_location(run.search, run.run_dir)
    assert storage == run.search.storage and name == "report-test"
    try:
        run.search.storage = "sqlite:///study.db"
        assert data.study_location(run.search, run.run_dir)[0] == f"sqlite:///{(run.run_dir / 'study.db').resolve()}"
        run.search.storage = "sqlite:///elsewhere/none.db"
        assert data.study_location(run.search, run.run_dir) == \
            "the study's storage sqlite:///elsewhere/none.db does not exist here"
    finally:
        run.search.storage = storage


def test_a_storage_outside_the_run_is_opened_only_when_named(run, tmp_path):
    storage = run.search.storage
    outside = tmp_path / "elsewhere" / "shared.db"
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes((run.run_dir / "study.db").read_bytes())
    try:
        run.search.storage = f"sqlite:///{outside}"
        assert data.study_location(run.search, run.run_dir) == \
            f"the study's storage sqlite:///{outside} is outside {run.run_dir}; pass --storage sqlite:///{outside} to read it"
        assert data.study_location(run.search, run.run_dir, f"sqlite:///{outside}") == \
            (f"sqlite:///{outside}", "report-test")
        run.search.storage = "postgresql://db.example/optuna"
        assert "pass --storage postgresql://db.example/optuna" in data.study_location(run.search, run.run_dir)
    finally:
        run.search.storage = storage


def test_summary_rows_state_budget_achieved_and_quality(run):
    rows = dict(data.summary_rows(run))
    best = run.search.trial(run.search.best)
    original_bytes = run.search.budget["original"]["memory_bytes"]
    assert rows["model"] == "tiny-llama" and rows["budget"] == run.search.budget["specs"][0]
    assert f"{100 * best.memory_bytes / original_bytes:.1f}% of the original" in rows["achieved memory"]
    assert "roofline h100" in rows["achieved latency"]
    assert rows["evaluation perplexity"] == "24 (+50.0% vs the original); original 16"
    assert rows["average bits (kept units)"] == "4.00"
    assert rows["against the baselines"].startswith("beats every baseline; best baseline uniform:bits=3")
    names = [r[0] for r in data.baseline_rows(run.search)]
    assert names == [f"chosen (trial {best.number}, tpe)", "uniform:bits=3", "knapsack"]


def test_eval_and_staged_tables(run):
    header, rows = data.eval_rows(run)
    assert header == ["metric", "original: tiny-llama", f"compressed: {run.run_dir}/model"]
    table = {r[0]: r[1:] for r in rows}
    assert table["perplexity"] == ["16", "24"] and table["size as stored"] == ["270.0 MiB", "60.0 MiB"]
    assert table["KL to reference"] == ["-", "0.25"] and table["top-1 agreement"] == ["-", "90.00%"]
    info = data.staged_info(run.staged)
    assert [s.gate for s in info.steps] == ["passed", "passed after recovery", "rolled back"]
    assert info.steps[1].recovered["perplexity"] == 19.0 and info.steps[0].recovered is None
    assert info.complete and info.final["bytes"] == 195 * 2**20 and info.frozen == ["tiny-llama"]
    header, rows = data.staged_rows(info)
    table = [dict(zip(header, row)) for row in rows]
    assert table[0]["units"] == "model.layers.1, model.layers.2" and table[0]["after recovery"] == "-"
    assert table[1]["units"] == "model.layers.0, model.layers.1, model.layers.2 and 2 more"
    assert (table[1]["size before"], table[1]["size after"], table[1]["KL after"]) == ("230.0 MiB", "195.0 MiB", "0.12")
    assert table[2]["failures"] == "step perplexity +58% > 25%"
    assert data.staged_info({"steps": []}).steps == []


def test_frontier_info_reads_measured_rows_and_this_runs_point(run):
    from autocompress.report.frontier_info import frontier_info, read_frontier

    info = frontier_info(read_frontier(run.run_dir), run.evaluation)
    assert [p.name for p in info.points] == [row[0] for row in FRONTIER_ROWS]  # the screened-only row left out
    rtn = info.points[1]
    assert (rtn.family, rtn.bytes, rtn.perplexity, rtn.aligned) == ("RTN", 80 * 2**20, 26.0, False)
    assert info.points[-1].aligned and info.tokens == 16384
    assert (info.own.bytes, info.own.perplexity) == (60 * 2**20, 24.0)  # eval.json
    assert frontier_info(None, None) is None
    assert frontier_info(None, run.evaluation).points == []
    assert frontier_info(read_frontier(run.run_dir), None).own is None


def test_frontier_file_that_is_broken_or_of_another_shape_is_ignored(tmp_path):
    from autocompress.report.frontier_info import read_frontier

    assert read_frontier(tmp_path) is None
    (tmp_path / "frontier.json").write_text("{not json")
    assert read_frontier(tmp_path) is None
    (tmp_path / "frontier.json").write_text(json.dumps({"rows": [1, 2]}))
    assert read_frontier(tmp_path) is None


def test_prediction_gap_rows_from_the_schedule_and_the_evaluation():
    from autocompress.report.frontier_info import prediction_gap_rows

    meta = {"search": {"predicted_kl": 0.0123456, "corrected_kl": None, "measured_kl": 0.02}}
    rows = prediction_gap_rows(meta, {"kl": 0.25, "tokens": 16384})
    assert rows == [("predicted by the additive profile model", "0.01235"),
                    ("measured on the held-aside calibration slice", "0.02"),
                    ("final: the saved model on 16384 evaluation tokens", "0.25")]
    assert prediction_gap_rows({}, None) == []


def test_frontier_section_draws_the_recipes_and_this_run(run_dir, tmp_path):
    page = write_report(run_dir).read_text()
    section = page[page.index('<section id="frontier"'):page.index('<section id="staged"')]
    assert 'class="missing"' not in section and "fig-frontier" in section
    assert "this run" in section and "GPTQ 4-bit g64" in section and "grid-aligned, not compared" in section
    # eval.json without frontier.json: the star alone, and a note naming the bench
    (tmp_path / "eval.json").write_bytes((run_dir / "eval.json").read_bytes())
    page = write_report(tmp_path).read_text()
    section = page[page.index('<section id="frontier"'):]
    assert "no frontier.json in this run: run bench/frontier.py" in section and "fig-frontier" in section


def test_format_bytes_picks_a_readable_unit():
    assert [data.format_bytes(v) for v in (None, 812, 3482, 5 * 2**20, 3 * 2**30)] == \
        ["-", "812 B", "3.4 KiB", "5.0 MiB", "3.00 GiB"]


def test_script_json_cannot_close_a_script_element():
    text = script_json({"name": "</script><b>&"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"name": "</script><b>&"}


def _plots(page: str) -> list[str]:
    return re.findall(r'<div class="plot" id="([^"]+)"', page)


def test_full_report_has_every_section_and_plotly_once(run_dir):
    page = write_report(run_dir).read_text()
    sections = re.findall(r'<section id="([^"]+)"', page)
    assert sections == ["summary", "sensitivity", "roles", "schedule", "pareto", "history", "importances",
                        "prediction", "evaluation", "frontier", "staged", "artifacts"]
    assert _plots(page) == ["fig-sensitivity", "fig-roles", "fig-schedule", "fig-pareto", "fig-history",
                            "fig-importances", "fig-prediction", "fig-frontier", "fig-staged"]
    assert 'class="missing"' not in page
    scripts = re.findall(r"<script[^>]*>", page)
    assert len(scripts) == 2 + len(_plots(page)) == page.count("</script>")  # packed plotly.js, loader, figures
    packed = re.search(r'<script type="application/octet-stream" id="plotly-js-gzip">([A-Za-z0-9+/=]+)</script>', page)
    assert gzip.decompress(base64.b64decode(packed.group(1))).decode() == get_plotlyjs()  # inlined once, intact
    assert len(page.encode()) < 5_000_000
    assert not re.search(r"<link|<img|<iframe|src=|@import|url\(", page.replace(packed.group(0), ""))


def test_report_without_a_study_falls_back_to_search_json(tmp_path, run_dir):
    for name in ("profile.json", "schedule.json"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    search = SearchResult.load(run_dir / "search.json")
    search.storage = "sqlite:///gone/study.db"
    search.save(tmp_path / "search.json")
    page = write_report(tmp_path).read_text()
    assert "fig-history" in _plots(page) and "fig-importances" not in _plots(page)
    assert "sqlite:///gone/study.db does not exist here" in page and "drawn from search.json instead" in page
    assert not (tmp_path / "gone").exists()
    assert "no eval.json" in page and 'id="staged"' not in page
    assert "no frontier.json (run bench/frontier.py) and no eval.json" in page


def test_empty_run_dir_says_what_is_missing(tmp_path):
    page = write_report(tmp_path).read_text()
    assert _plots(page) == []
    assert page.count('class="missing"') == 9  # every section but the summary and the artifact list
    assert "no frontier.json (run bench/frontier.py) and no eval.json" in page
    assert "run `autocompress profile MODEL --out RUN`" in page


def test_strings_from_models_and_files_are_escaped(tmp_path):
    run_dir = build_run(tmp_path / "evil", model=EVIL, study=False)
    profile = make_profile(EVIL)
    profile.units[0].name = EVIL  # a unit name from a (hostile) model
    profile.units[0].dominant_role = EVIL
    profile.save(run_dir / "profile.json")
    page = write_report(run_dir).read_text()
    assert EVIL not in page and "alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown as text in the title, tables and figures
    assert f"<title>autocompress report: {EVIL.replace('<', '&lt;').replace('>', '&gt;')}</title>" in page
    assert len(re.findall(r"<script[^>]*>", page)) == page.count("</script>") == 2 + len(_plots(page))


def test_cli_report_writes_the_page_and_lists_artifacts(tmp_path, run_dir, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.exists() and "wrote" in printed and "profile.json" in printed
    assert main(["report", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a run directory" in err


def test_block_params_feed_the_average(run):
    # The weights come from UnitProfile.parameters: doubling one block's count moves the average towards it.
    profile = make_profile()
    profile.units[-1].parameters = 3 * BLOCK_PARAMS  # unit_name(0), 4 bits
    info = data.schedule_info(make_schedule(profile), profile)
    assert info.average_bits == pytest.approx((3 * 4 + 3 + 2 + 3 + 8) / 7)


def test_value_axes_are_logarithmic_only_over_more_than_a_decade():
    from autocompress.report.figures import value_axis

    assert value_axis([0.001, 0.5, None])["type"] == "log"
    assert value_axis([0.002, 0.007])["type"] == "linear" and value_axis([None, 0.0])["type"] == "linear"


def test_optuna_figures_from_a_multi_objective_journal_study(tmp_path):
    import optuna
    import plotly.graph_objects as go
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from autocompress.report.figures import optuna_figures

    journal = tmp_path / "study.log"
    study = optuna.create_study(study_name="nsga", directions=["minimize", "minimize"],
                                storage=JournalStorage(JournalFileBackend(str(journal))),
                                sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(lambda t: (t.suggest_float("a", 0, 1) + t.suggest_int("b", 2, 4), t.suggest_float("c", 0, 1)),
                   n_trials=8)
    drawn = optuna_figures(str(journal), "nsga")
    assert isinstance(drawn["history"], go.Figure) and isinstance(drawn["importances"], go.Figure)
    assert {bar for trace in drawn["importances"].data for bar in trace.y} == {"a", "b", "c"}
    assert len(drawn["history"].data[0].x) == 8
    missing = optuna_figures(str(journal), "no-such-study")
    assert missing["history"].startswith("the Optuna study 'no-such-study' could not be opened")
