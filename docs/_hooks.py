"""mkdocs hooks: publish benchmarks/README.md and its plots as the "Benchmarks" page; render test fences.

One source: the page is the README that sits next to the scripts and their results, so the numbers
in the docs are the numbers in the repository. Links from the README into docs/ are made relative to
the page, and the PNGs in benchmarks/results/ are added to the site under results/.
"""

import re
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


# "```python notest" marks a block the page tests skip (tests/test_doc_pages.py); superfences takes
# the second word for a broken fence and prints the block as a paragraph: render it as Python.
NOTEST = re.compile(r"^(\s*(?:`{3,}|~{3,}))python notest[ \t]*$", re.MULTILINE)


def on_page_markdown(markdown, page, config, files):
    markdown = NOTEST.sub(r"\1python", markdown)
    if MARKER not in markdown:
        return markdown
    text = README.read_text(encoding="utf-8").replace("](../docs/", "](")
    return markdown.replace(MARKER, text)
