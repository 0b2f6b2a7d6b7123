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
    assert lines[0] == ("id_dataset,backbone,scorer,paper_method,ood,fpr95,auroc,aupr_in,aupr_out,paper_fpr95,"
                        "paper_auroc,diff_fpr95,diff_auroc")  # fmt: skip
    assert "cifar10,resnet18,fmls,Ours,svhn,20.0,96.0,90.0,80.0,22.3,96.26,-2.3,-0.26" in lines


def test_the_paper_average_is_shown_only_over_the_papers_sets():
    sets = ["svhn", "lsun_crop", "lsun_resize", "isun", "textures", "places365"]
    values = {"fpr95": 0.3, "auroc": 0.9, "aupr_in": 0.9, "aupr_out": 0.9}
    report = make_report(metrics={"fmls": {s: values for s in sets}})
    average = next(r for r in report.rows() if r["ood"] == "Average")
    assert (average["paper_fpr95"], average["paper_auroc"]) == (30.92, 94.32)
    assert (average["diff_fpr95"], average["diff_auroc"]) == (-0.92, -4.32)


def test_markdown_table(tmp_path):
    report = make_report(skipped={"places365": "not found"})
    md = report.to_markdown()
    assert "| Method | svhn FPR95↓ | svhn AUROC↑ | textures FPR95↓ | textures AUROC↑ | Average FPR95↓ |" in md
    assert (
        "| fmls | 20.00 (22.30, -2.30) | 96.00 (96.26, -0.26) | 40.00 (39.04, +0.96) | 90.00 (92.79, -2.79) | 30.00 |"
        in md
    )
    assert "| maxlogit | 50.00 | 91.00 | 60.00 | 89.00 | 55.00 | 90.00 |" in md
    assert "accuracy: 95.00%" in md and "Skipped OOD sets: places365 (not found)" in md
    written_md, written_csv, written_json = report.write(tmp_path)
    assert written_md.read_text() == md and written_csv.read_text() == report.to_csv()
    assert json.loads(written_json.read_text())["metrics"]["fmls"]["svhn"]["fpr95"] == 0.20  # full precision
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ood_results.csv", "ood_results.json", "ood_results.md"]


def test_rich_table_marks_the_best_fpr():
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(make_report().rich_table())
    text = console.export_text()
    assert "20.00 (22.30, -2.30) / 96.00 (96.26, -0.26)" in text and "maxlogit" in text
