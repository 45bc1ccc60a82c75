"""Pages per second of the pdf_extractor plugin next to ``pdftotext`` (poppler-utils), same files, same run.

    .venv/bin/python bench/pdf_extract.py [--docs 200] [--pages 10]

Generates a corpus of text PDFs (samples/make_pdf.py, half of them with compressed content
streams), then extracts every file with the plugin's ``extract`` (all its checks included:
header, %%EOF, inflated-size scan, page limit) and with ``pdftotext`` (one process per file,
as a shell pipeline would run it).  Installs poppler-utils with apt-get when it is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("sqapi message plugin extract index search webhook queue data metadata document page text "
         "report revenue growth quarter customer invoice contract").split()


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ensure_pdftotext() -> str:
    found = shutil.which("pdftotext")
    if found:
        return found
    print("pdftotext missing: installing poppler-utils", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "poppler-utils"], check=True,
                   env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    found = shutil.which("pdftotext")
    if not found:
        sys.exit("could not install pdftotext (poppler-utils)")
    return found


def corpus(folder: Path, docs: int, pages: int, make_pdf: ModuleType) -> list[Path]:
    rng = random.Random(7)
    files = []
    for n in range(docs):
        texts = ["\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(40)) for _ in range(pages)]
        path = folder / f"doc{n:04d}.pdf"
        path.write_bytes(make_pdf.build_pdf(texts, compress=n % 2 == 1))
        files.append(path)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--pages", type=int, default=10)
    args = parser.parse_args()
    pdftotext = ensure_pdftotext()
    make_pdf = load("bench_make_pdf", ROOT / "samples" / "make_pdf.py")
    extractor = load("bench_pdf_extractor", ROOT / "plugins" / "pdf_extractor" / "__init__.py")
    limits = {**extractor.DEFAULTS, "max_seconds": 300.0}

    with tempfile.TemporaryDirectory() as tmp:
        files = corpus(Path(tmp), args.docs, args.pages, make_pdf)
        total_pages = args.docs * args.pages
        print(f"corpus: {args.docs} PDFs x {args.pages} pages = {total_pages} pages, "
              f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB")

        started = time.perf_counter()
        chars = 0
        for path in files:
            with open(path, "rb") as handle:
                result = extractor.extract(handle, limits)
            assert result["pages"] == args.pages
            chars += result["chars"]
        ours = time.perf_counter() - started

        started = time.perf_counter()
        for path in files:
            subprocess.run([pdftotext, "-q", str(path), "-"], check=True, stdout=subprocess.DEVNULL)
        theirs = time.perf_counter() - started

    print(f"{'extractor':<28}{'seconds':>10}{'pages/s':>12}")
    print(f"{'pdf_extractor (pypdfium2)':<28}{ours:>10.2f}{total_pages / ours:>12.0f}   ({chars} chars)")
    print(f"{'pdftotext (per-file process)':<28}{theirs:>10.2f}{total_pages / theirs:>12.0f}")


if __name__ == "__main__":
    main()
