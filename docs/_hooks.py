"""mkdocs hooks: publish benchmarks/README.md and its plots as the "Benchmarks" page.

One source: the page is the README that sits next to the scripts and their results, so the numbers
in the docs are the numbers in the repository. Links from the README into docs/ are made relative to
the page, and the PNGs in benchmarks/results/ are added to the site under results/.
"""

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "benchmarks" / "README.md"
MARKER = "<!-- benchmarks/README.md -->"


def on_files(files, config):
    for png in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        files.append(File(f"results/{png.name}", str(ROOT / "benchmarks"), config["site_dir"],
                          config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    text = README.read_text(encoding="utf-8").replace("](../docs/", "](")
    return markdown.replace(MARKER, text)
