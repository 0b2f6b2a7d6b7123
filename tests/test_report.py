"""lightning_ood/report.py: result tables (Markdown, CSV, LaTeX, console) and the paper's figures."""

from __future__ import annotations

import json

import pytest

from lightning_ood.report import OODReport, paper_figure, paper_results


def make_report(**kwargs) -> OODReport:
    metrics = {
        "fmls": {
            "svhn": {"fpr95": 0.20, "auroc": 0.96, "aupr_in": 0.9, "aupr_out": 0.8},
            "textures": {"fpr95": 0.40, "auroc": 0.90, "aupr_in": 0.7, "aupr_out": 0.6},
        },
        "maxlogit": {
            "svhn": {"fpr95": 0.50, "auroc": 0.91, "aupr_in": 0.5, "aupr_out": 0.4},
            "textures": {"fpr95": 0.60, "auroc": 0.89, "aupr_in": 0.3, "aupr_out": 0.2},
        },
    }
    defaults = dict(id_name="cifar10", backbone="resnet18", accuracy=0.95, metrics=metrics,
                    num_images={"cifar10": 10000, "svhn": 26032, "textures": 5640})  # fmt: skip
    return OODReport(**{**defaults, **kwargs})


def test_paper_figures_are_shipped_and_looked_up():
    # 413 rows of Tables I, II, IV (Table IV repeats 12 averages of Tables I and II), 6 Table III ablation averages and
    # 50 rows of Table V (ViT-B/16), parsed from the paper's text
    assert len(paper_results()) == 401 + 6 + 50
    assert paper_figure("cifar100", "densenet100", "react_fm", "Average") == (36.74, 90.01)  # Table III
    assert paper_figure("imagenet", "resnet50", "fm_ls", "Average") == (32.51, 92.36)
    assert paper_figure("imagenet", "vit_b_16", "fmls", "Average") == (28.89, 93.54)  # Table V
    assert paper_figure("imagenet", "vit_b_16", "line", "sun") == (33.79, 93.28)
    assert paper_figure("cifar10", "resnet18", "fmls", "svhn") == (22.30, 96.26)
    assert paper_figure("cifar100", "densenet100", "line", "Average") == (35.67, 88.68)
    assert paper_figure("imagenet", "resnet50", "dice_react", "inaturalist") == (18.64, 96.24)  # "DICE + ReAct"
    assert paper_figure("cifar10", "densenet100", "odin_fmls", "Average") == (14.60, 97.10)  # Table IV
    assert paper_figure("cifar10", "resnet18", "maxlogit", "svhn") is None  # not in the paper
    assert paper_figure("cifar10", "resnet20", "fmls", "svhn") is None  # not the paper's backbone
    assert paper_figure("cifar10", "resnet18", "fmls", "mnist") is None  # not the paper's OOD set


def test_averages_are_means_over_ood_sets():
    report = make_report()
    assert report.average("fmls") == pytest.approx({"fpr95": 0.30, "auroc": 0.93, "aupr_in": 0.8, "aupr_out": 0.7})


def test_rows_and_csv_carry_paper_figures():
    report = make_report()
    rows = {(r["scorer"], r["ood"]): r for r in report.rows()}
    assert rows[("fmls", "svhn")]["fpr95"] == 20.0 and rows[("fmls", "svhn")]["paper_fpr95"] == 22.30
    assert rows[("fmls", "Average")]["fpr95"] == 30.0
    assert rows[("fmls", "Average")]["paper_fpr95"] == ""  # the paper averages six sets: not comparable with two
    assert rows[("fmls", "svhn")]["diff_fpr95"] == -2.3 and rows[("fmls", "svhn")]["diff_auroc"] == -0.26
    assert rows[("maxlogit", "svhn")]["paper_fpr95"] == ""
    lines = report.to_csv().splitlines()
    assert lines[0] == ("id_dataset,backbone,scorer,paper_method,ood,images,fpr95,auroc,aupr_in,aupr_out,paper_fpr95,"
                        "paper_auroc,diff_fpr95,diff_auroc")  # fmt: skip
    assert "cifar10,resnet18,fmls,Ours,svhn,26032,20.0,96.0,90.0,80.0,22.3,96.26,-2.3,-0.26" in lines


def test_the_paper_average_is_shown_only_over_the_papers_sets():
    sets = ["svhn", "lsun_crop", "lsun_resize", "isun", "textures", "places365"]
    values = {"fpr95": 0.3, "auroc": 0.9, "aupr_in": 0.9, "aupr_out": 0.9}
    report = make_report(metrics={"fmls": {s: values for s in sets}})
    average = next(r for r in report.rows() if r["ood"] == "Average")
    assert (average["paper_fpr95"], average["paper_auroc"]) == (30.92, 94.32)
    assert (average["diff_fpr95"], average["diff_auroc"]) == (-0.92, -4.32)


def test_markdown_tables_mark_the_best_and_carry_aupr_and_sizes(tmp_path):
    report = make_report(skipped={"places365": "not found"})
    md = report.to_markdown()
    assert "Images: ID cifar10: 10000 images; OOD: SVHN 26032, Textures 5640." in md
    for title in ("### FPR95↓", "### AUROC↑", "### AUPR-In↑", "### AUPR-Out↑"):
        assert title in md
    assert "| Method | SVHN | Textures | Average |" in md
    # FPR: lower is better (fmls best, bold; maxlogit second, underlined); the paper's figure and the difference
    assert "| fmls | **20.00 (22.30, -2.30)** | **40.00 (39.04, +0.96)** | **30.00** |" in md
    assert "| maxlogit | <u>50.00</u> | <u>60.00</u> | <u>55.00</u> |" in md
    assert "| maxlogit | <u>50.00</u> | <u>30.00</u> | <u>40.00</u> |" in md  # AUPR-In: higher is better
    assert "accuracy: 95.00%" in md and "Skipped OOD sets: places365 (not found)" in md
    written = report.write(tmp_path)
    assert [p.name for p in written] == ["ood_results.md", "ood_results.csv", "ood_results.json", "ood_results.tex"]
    assert written[0].read_text() == md and written[1].read_text() == report.to_csv()
    assert json.loads(written[2].read_text())["metrics"]["fmls"]["svhn"]["fpr95"] == 0.20  # full precision


def test_values_are_clamped_and_rounded():
    metrics = {"msp": {"svhn": {"fpr95": 0.123456, "auroc": 1.0000001192092896, "aupr_in": -1e-9, "aupr_out": 1.0}}}
    report = make_report(metrics=metrics)
    row = report.rows()[0]
    assert (row["fpr95"], row["auroc"], row["aupr_in"]) == (12.35, 100.0, 0.0)
    assert json.loads(report.to_json())["metrics"]["msp"]["svhn"]["auroc"] == 1.0


def test_latex_table_in_the_papers_layout():
    tex = make_report().to_latex()
    assert r"\begin{tabular}{lrrrrrr}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"Method & \multicolumn{2}{c}{SVHN} & \multicolumn{2}{c}{Textures} & \multicolumn{2}{c}{Average} \\" in tex
    assert (
        r"Ours & \textbf{20.00} & \textbf{96.00} & \textbf{40.00} & \textbf{90.00} & \textbf{30.00} & \textbf{93.00} \\"
        in tex
    )
    assert r"maxlogit & \underline{50.00} & \underline{91.00}" in tex


def test_console_tables_fit_120_columns_with_the_papers_six_sets():

    from rich.console import Console

    sets = ["svhn", "lsun_crop", "lsun_resize", "isun", "textures", "places365"]
    names = ["msp", "odin", "mahalanobis", "energy", "bats", "dice", "react", "dice_react", "line", "fmls",
             "odin_fmls", "bats_empirical", "temp_scaling"]  # fmt: skip
    values = {"fpr95": 0.3456, "auroc": 0.91234, "aupr_in": 0.9, "aupr_out": 0.8}
    report = make_report(metrics={n: {s: values for s in sets} for n in names})
    console = Console(record=True, width=120)
    for table in report.rich_tables():
        console.print(table)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "…" not in text  # nothing cut
    for name in [*names, "SVHN", "LSUN-C", "LSUN-R", "iSUN", "Textures", "Places365", "Average"]:
        assert name in text
    assert "34.56 +12.26" in text  # fmls on SVHN: ours, and ours minus the paper's 22.30
    rows = [line for line in text.splitlines() if line.strip().startswith("odin_fmls")]
    assert len(rows) == 2  # one line per method in each table


def test_rich_tables_mark_the_best():

    from rich.console import Console

    console = Console(record=True, width=200)
    for table in make_report().rich_tables():
        console.print(table)
    text = console.export_text()
    assert "20.00 -2.30" in text and "96.00 -0.26" in text and "maxlogit" in text


def test_the_legend_mentions_the_paper_only_where_a_cell_is_compared():
    import io

    from rich.console import Console

    metrics = {"fmls": {"noise": {"fpr95": 0.2, "auroc": 0.9, "aupr_in": 0.5, "aupr_out": 0.5}}}
    ours = OODReport("synthetic", "resnet20", 0.9, metrics, {"synthetic": 10, "noise": 10})
    paper = OODReport("cifar10", "resnet18", 0.9, {"fmls": {"svhn": metrics["fmls"]["noise"]}})
    for report, compared in ((ours, False), (paper, True)):
        console = Console(width=120, record=True, file=io.StringIO())
        for table in report.rich_tables():
            console.print(table)
        assert ("ours minus the paper's" in console.export_text()) is compared
        assert ("ours minus the paper's" in report.to_markdown()) is compared


def test_console_tables_with_near_and_far_averages_cut_no_number(monkeypatch):
    from rich.console import Console

    from lightning_ood.report import results_console

    sets = ["svhn", "lsun_crop", "lsun_resize", "isun", "textures", "places365"]
    groups = {"svhn": "near", "lsun_crop": "near", **{s: "far" for s in sets[2:]}}
    names = ["msp", "mahalanobis", "dice_react", "fmls", "bats_empirical", "temp_scaling", "mds_ensemble"]
    values = {"fpr95": 0.3456, "auroc": 0.91234, "aupr_in": 0.9, "aupr_out": 0.8}
    report = make_report(metrics={n: {s: values for s in sets} for n in names}, groups=groups)
    monkeypatch.delenv("COLUMNS", raising=False)
    console = results_console()  # pytest's output is no terminal: 120 columns, not rich's 80
    assert console.width == 120
    recorder = Console(record=True, width=console.width)
    for table in report.rich_tables(console.width):
        recorder.print(table)
    text = recorder.export_text()
    assert "ours minus the paper's figures: in ood_results.md (too wide here)" in text  # fmls: SVHN, Textures
    assert "-5.03" in report.to_markdown()  # fmls on SVHN: ours minus the paper's, in the markdown
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "…" not in text
    for name in names:
        assert name in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith("mds_ensemble")]
    assert rows[0][1:] == ["34.56"] * 9  # six sets, near, far, all: whole numbers, one line
    assert "near)" in text and "far)" in text


def test_console_tables_without_colours_mark_the_best_with_a_star():
    """A log file has no colours: the best of each column is marked ``*`` and the legend says so."""
    from rich.console import Console

    names = ["msp", "energy", "fmls"]
    metrics = {n: {"svhn": {"fpr95": f, "auroc": 1 - f, "aupr_in": 0.9, "aupr_out": 0.8}} for n, f in
               zip(names, [0.5, 0.4, 0.2], strict=True)}  # fmt: skip
    report = make_report(metrics=metrics, backbone="resnet20", num_images={"cifar10": 100, "svhn": 100})  # no paper
    recorder = Console(record=True, width=120, color_system=None)
    for table in report.rich_tables(120, colour=False):
        recorder.print(table)
    text = recorder.export_text()
    assert "*: the best" in text and "green" not in text
    fmls_rows = [line.split() for line in text.splitlines() if line.strip().startswith("fmls")]
    assert all(cell.endswith("*") for row in fmls_rows for cell in row[1:])  # best everywhere: 20.00*, 80.00*
    msp_rows = [line.split() for line in text.splitlines() if line.strip().startswith("msp")]
    assert not any("*" in cell for row in msp_rows for cell in row[1:])


@pytest.mark.usefixtures("one_thread")
def test_report_maps_the_imagenet_names_to_the_paper():
    assert paper_figure("imagenet", "resnet50", "fmls", "inaturalist") == (8.91, 98.18)
    assert paper_figure("imagenet", "resnet50", "react", "Average") == (31.43, 92.95)
    assert paper_figure("imagenet", "mobilenet_v2", "msp", "sun") == (77.02, 77.1)
