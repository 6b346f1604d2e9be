"""The book: every notebook runs headless through papermill, and Jupyter Book builds from them.

One module-scoped build (tiny profile, a small synthetic dataset, two variants) serves all
tests; it takes a couple of minutes on two cores.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book"))  # the book's build script, book/toc.py
from toc import title_training_pages, toc_text, write_toc  # noqa: E402

VARIANTS = ["res1", "se", "se-multi"]
NOTEBOOKS = ["01_data", "02_train", "03_evaluate", "04_excitations", "05_tag_music"]


def _execute(book: Path, name: str, page: str, **parameters) -> Path:
    target = book / "executed" / f"{page}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(book / "notebooks" / f"{name}.ipynb"),
        str(target),
        parameters=parameters,
        cwd=str(book / "notebooks"),
        progress_bar=False,
        kernel_name="python3",
    )
    return target


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    work = tmp_path_factory.mktemp("book")
    book = work / "book"
    shutil.copytree(
        ROOT / "book", book, ignore=shutil.ignore_patterns("_build", "executed", "_toc.yml")
    )
    data, runs = str(work / "synth"), str(work / "runs")
    store = str(work / "store")
    _execute(book, "01_data", "01_data", root=data, store_dir=store, synth_clips=32, workers=2)
    for variant in VARIANTS:
        _execute(
            book,
            "02_train",
            f"train/{variant}",
            variant=variant,
            profile="tiny",
            data=store,
            out=f"{runs}/{variant}",
            device="cpu",
        )
    _execute(book, "03_evaluate", "03_evaluate", runs=runs, data=store, device="cpu")
    _execute(
        book, "04_excitations", "04_excitations", run=f"{runs}/se-multi", data=store, device="cpu"
    )
    _execute(
        book,
        "05_tag_music",
        "05_tag_music",
        checkpoint=f"{runs}/se-multi",
        data=store,
        device="cpu",
        out=str(work / "tagging"),
    )
    write_toc(book / "_toc.yml", VARIANTS)
    title_training_pages(book / "executed", VARIANTS)
    build = subprocess.run(
        [
            str(Path(sys.executable).parent / "jupyter-book"),
            "build",
            str(book),
            "-W",
            "--keep-going",
        ],
        capture_output=True,
        text=True,
    )
    return book, build, work


def test_every_notebook_executes_with_the_tiny_profile(built_book):
    book, _, work = built_book
    executed = sorted(
        p.relative_to(book / "executed").as_posix() for p in (book / "executed").rglob("*.ipynb")
    )
    assert executed == sorted(
        ["01_data.ipynb", "03_evaluate.ipynb", "04_excitations.ipynb", "05_tag_music.ipynb"]
        + [f"train/{v}.ipynb" for v in VARIANTS]
    )
    for page, figures in [
        ("01_data", 4),
        ("03_evaluate", 3),
        ("04_excitations", 4),
        ("05_tag_music", 1),
    ]:
        notebook = nbformat.read(book / "executed" / f"{page}.ipynb", as_version=4)
        images = [
            o
            for c in notebook.cells
            for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})
        ]
        assert len(images) == figures, page  # figures display as images, not as their repr
    evaluation = nbformat.read(book / "executed" / "03_evaluate.ipynb", as_version=4)
    assert not any(
        o.get("output_type") == "error" for c in evaluation.cells for o in c.get("outputs", [])
    )
    for variant in VARIANTS:
        metrics = json.loads((work / "runs" / variant / "metrics.json").read_text())
        assert metrics["variant"] == variant and metrics["split"] == "test"
    excitations = work / "runs" / "se-multi" / "excitations"
    assert (excitations / "excitations.npz").is_file()
    assert len(list(excitations.glob("*.png"))) == 4


def test_notebooks_are_thin_and_start_with_parameters():
    for name in NOTEBOOKS:
        notebook = nbformat.read(ROOT / "book" / "notebooks" / f"{name}.ipynb", as_version=4)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), name
        assert not any(c.get("outputs") for c in code), f"{name} is committed with outputs"
        for cell in code:
            assert not any(line.startswith(("def ", "class ")) for line in cell.source.splitlines())


def test_the_book_builds_without_warnings(built_book):
    book, build, work = built_book
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    html = book / "_build" / "html"
    for page in ["intro", "executed/03_evaluate", "executed/04_excitations", "reproduce", "api"]:
        assert (html / f"{page}.html").is_file(), page
    evaluation = (html / "executed" / "03_evaluate.html").read_text()
    assert "paper ROC-AUC (MTAT)" in evaluation and "<img" in evaluation
    assert "ROC-AUC [95 % clips]" in evaluation  # every score with its interval
    assert "multi-level aggregation helps SE" in evaluation  # the claims table
    excitation = (html / "executed" / "04_excitations.html").read_text()
    assert "Did the gates learn?" in excitation and "most first-block channels" in excitation
    tagging = (html / "executed" / "05_tag_music.html").read_text()
    assert "Tag your own music" in tagging and "linear probe on embeddings" in tagging
    assert "probe - head (paired over clips)" in tagging
    assert "not on MagnaTagATune" in tagging  # the demo model is never presented as MTAT's
    assert (work / "tagging" / "taggram.png").is_file()
    assert "Training se-multi" in (html / "training.html").read_text()
    for variant in VARIANTS:  # each training page is titled with its variant
        page = (html / "executed" / "train" / f"{variant}.html").read_text()
        assert f"<title>Training {variant}" in page
        assert re.search(rf"<h1>Training {re.escape(variant)}<a", page)
    data_page = (html / "executed" / "01_data.html").read_text()
    assert data_page.count("<audio") >= 3 and "data:audio/" in data_page
    spec = (html / "specification.html").read_text()
    for label in [
        "eq-se-gate",
        "eq-residual",
        "eq-bce",
        "eq-roc-auc",
        "eq-lr",
        "eq-early-stopping",
    ]:
        assert f'id="equation-{label}"' in spec, label
    cite = re.sub(r"<[^>]+>", "", (html / "cite.html").read_text())  # text without highlighting
    assert "@inproceedings{kim2018sample" in cite and "1710.10451" in cite


def test_an_unknown_variant_stops_the_training_notebook_with_the_valid_names(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match="valid variants: basic"):
        papermill.execute_notebook(
            str(ROOT / "book" / "notebooks" / "02_train.ipynb"),
            str(tmp_path / "out.ipynb"),
            parameters={"variant": "rese3", "data": str(tmp_path)},
            cwd=str(ROOT / "book" / "notebooks"),
            progress_bar=False,
            kernel_name="python3",
        )


def test_toc_lists_the_cite_page_and_titles_training_pages(tmp_path):
    text = toc_text(["se-multi"])
    assert "      - file: cite\n" in text and 'title: "Training se-multi"' in text
    notebook = nbformat.read(ROOT / "book" / "notebooks" / "02_train.ipynb", as_version=4)
    (tmp_path / "train").mkdir()
    nbformat.write(notebook, tmp_path / "train" / "se-multi.ipynb")
    assert title_training_pages(tmp_path, ["se-multi", "basic"]) == [
        tmp_path / "train" / "se-multi.ipynb"
    ]
    retitled = nbformat.read(tmp_path / "train" / "se-multi.ipynb", as_version=4)
    first = retitled.cells[0].source.splitlines()
    assert (
        first[0] == "# Training se-multi" and first[1:] == notebook.cells[0].source.splitlines()[1:]
    )
    assert title_training_pages(tmp_path, ["se-multi"]) == []  # idempotent


def test_cite_page_gives_the_library_version():
    from resemul_core._version import __version__

    cite = (ROOT / "book" / "cite.md").read_text()
    assert f"version = {{{__version__}}}" in cite and "@inproceedings{kim2018sample" in cite
    bib = (ROOT / "book" / "references.bib").read_text()
    assert "@misc{resemul_companion" in bib and f"version {__version__}" in bib
