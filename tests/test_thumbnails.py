"""docs/make_images.py draws one README thumbnail per notebook, and the committed ones are present."""

import importlib.util
import pathlib

import matplotlib.image

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("0[0-3]_*.ipynb"))


def test_make_images_writes_one_png_per_notebook(tmp_path):
    """The script writes a non-blank PNG named after each of notebooks 00-03 (its main(), run in this process)."""
    spec = importlib.util.spec_from_file_location("make_images", ROOT / "docs" / "make_images.py")
    make_images = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_images)
    assert make_images.main(["--out", str(tmp_path)]) == [tmp_path / f"{name}.png" for name in NOTEBOOKS]
    assert NOTEBOOKS == ["00_start_here", "01_clipped_loss_1d", "02_loss_surfaces", "03_gradients"]
    for name in NOTEBOOKS:
        image = matplotlib.image.imread(tmp_path / f"{name}.png")
        assert image.shape[0] > 150 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05, f"{name}.png looks blank"


def test_readme_links_every_thumbnail():
    """README.md shows docs/images/<notebook>.png for each notebook, and the files are committed."""
    readme = (ROOT / "README.md").read_text()
    for name in NOTEBOOKS:
        assert f"docs/images/{name}.png" in readme and f"notebooks/{name}.ipynb" in readme
        assert (ROOT / "docs" / "images" / f"{name}.png").is_file()
