#!/usr/bin/env python3
"""Check the links of every Markdown file in the repository, offline.

Usage: scripts/check-links.py [-v] [ROOT]

ROOT defaults to the repository this script is in. Checked:

- every relative link and image (`[text](path)`, `[text](path#anchor)`,
  `[text](#anchor)`, `[label]: path`) in every *.md file git tracks (and
  new files git does not ignore): the file or directory must exist inside
  the repository, and an `#anchor` into a Markdown file must name one of
  its headings (GitHub's slugs: lower case, punctuation dropped, spaces to
  `-`, `-1`, `-2`... for repeats) or an `<a id=...>`/`<a name=...>`;
- the book (docs/src/SUMMARY.md): every page it lists exists (above), and
  every page under docs/src is listed in it.

Links with a scheme (https:, mailto:...) are not fetched: no network.
Text in code blocks and code spans is not a link. Exits 1 naming each
broken link as FILE:LINE: message, 0 when all are good. Python 3 stdlib only.
"""

import os
import re
import subprocess
import sys
import unicodedata

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")
# [text](target) and ![alt](target); text may hold one level of brackets
# and span lines.
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]*)(?:\s+\"[^\"]*\"|\s+'[^']*')?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files(root):
    """Tracked and untracked-but-not-ignored *.md files, relative paths."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.md"],
            cwd=root, check=True, capture_output=True,
        ).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for d, dirs, names in os.walk(root):
            dirs[:] = [x for x in dirs if not x.startswith(".") and x != "target"]
            files += [os.path.relpath(os.path.join(d, n), root) for n in names if n.endswith(".md")]
    return sorted(f for f in set(files) if os.path.isfile(os.path.join(root, f)))


def prose_lines(text):
    """(line number, line with code spans blanked, line as written) of
    every line outside fenced code blocks."""
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = None
            continue
        if m:
            fence = m.group(1)
            continue
        yield n, CODE_SPAN.sub(lambda s: " " * len(s.group(0)), line), line


def plain_text(heading):
    """A heading's rendered text, as GitHub makes its anchor from."""
    t = CODE_SPAN.sub(lambda s: s.group(2), heading)
    t = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", t)  # links: their text
    t = re.sub(r"<[^>]+>", "", t)  # inline HTML
    t = re.sub(r"(\*\*|__|\*)", "", t)  # emphasis markers
    return t


def slug(text):
    """GitHub's anchor for a heading's text (github-slugger's rule)."""
    out = []
    for ch in plain_text(text).strip().lower():
        cat = unicodedata.category(ch)
        if ch in "-_" or cat[0] in "LMN":
            out.append(ch)
        elif ch == " ":
            out.append("-")
    return "".join(out)


def anchors(text):
    """Every anchor a Markdown file offers."""
    seen, result = {}, set()
    lines = list(prose_lines(text))
    for i, (n, line, raw) in enumerate(lines):
        result.update(HTML_ANCHOR.findall(line))
        title = None
        m = HEADING.match(line)
        if m:
            title = HEADING.match(raw).group(2)
        elif (
            i + 1 < len(lines)
            and lines[i + 1][0] == n + 1
            and line.strip()
            and SETEXT.match(lines[i + 1][1])
            and not line.lstrip().startswith(("-", "*", "+", "|", ">"))
        ):
            title = raw.strip()  # a setext heading: text over === or ---
        if title is None:
            continue
        s = slug(title)
        k = seen.get(s, 0)
        seen[s] = k + 1
        result.add(s if k == 0 else f"{s}-{k}")
    return result


def links(text):
    """(line number, target) of every link in a Markdown file; a link's
    text may wrap onto the next lines."""
    lines = {n: line for n, line, _ in prose_lines(text)}
    count = len(text.splitlines())
    prose = "\n".join(lines.get(n, "") for n in range(1, count + 1))
    for m in INLINE.finditer(prose):
        yield prose.count("\n", 0, m.start()) + 1, m.group(1).strip("<>")
    for n, line in lines.items():
        m = REFDEF.match(line)
        if m:
            yield n, m.group(1).strip("<>")


def check(root):
    root = os.path.realpath(root)
    errors = []
    files = markdown_files(root)
    texts = {}

    def text_of(rel):
        if rel not in texts:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                texts[rel] = f.read()
        return texts[rel]

    anchor_cache = {}

    def anchors_of(rel):
        if rel not in anchor_cache:
            anchor_cache[rel] = anchors(text_of(rel))
        return anchor_cache[rel]

    checked = 0
    for rel in files:
        for n, target in links(text_of(rel)):
            if not target or SCHEME.match(target):
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            path = re.sub(r"\?.*$", "", path)
            where = f"{rel}:{n}"
            if path:
                if path.startswith("/"):
                    errors.append(f"{where}: {target}: an absolute path (use a relative link)")
                    continue
                full = os.path.realpath(os.path.join(root, os.path.dirname(rel), path))
                dest = os.path.relpath(full, root)
                if dest.startswith(".."):
                    errors.append(f"{where}: {target}: points outside the repository")
                    continue
                if not os.path.exists(full):
                    errors.append(f"{where}: {target}: no such file {dest}")
                    continue
            else:
                dest = rel
            if anchor and dest.endswith(".md") and os.path.isfile(os.path.join(root, dest)):
                if anchor not in anchors_of(dest):
                    errors.append(f"{where}: {target}: {dest} has no heading #{anchor}")
    errors += check_book(root, text_of)
    return errors, len(files), checked


def check_book(root, text_of):
    """Every page under docs/src is listed in SUMMARY.md (the links of
    SUMMARY.md itself are checked like any file's)."""
    src = os.path.join(root, "docs", "src")
    summary = os.path.join(src, "SUMMARY.md")
    if not os.path.isdir(src):
        return []
    if not os.path.isfile(summary):
        return ["docs/src/SUMMARY.md: missing (the book's table of contents)"]
    listed = set()
    for _, target in links(text_of("docs/src/SUMMARY.md")):
        path = target.partition("#")[0]
        if path and not SCHEME.match(target):
            listed.add(os.path.normpath(os.path.join(src, path)))
    errors = []
    for d, _, names in os.walk(src):
        for name in sorted(names):
            full = os.path.normpath(os.path.join(d, name))
            if name.endswith(".md") and full != summary and full not in listed:
                errors.append(f"{os.path.relpath(full, root)}: not listed in docs/src/SUMMARY.md")
    return errors


def main(argv):
    verbose = "-v" in argv
    args = [a for a in argv if a != "-v"]
    if any(a.startswith("-") for a in args) or len(args) > 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    root = args[0] if args else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    errors, nfiles, nlinks = check(root)
    for e in errors:
        print(f"broken link: {e}", file=sys.stderr)
    if errors:
        print(f"check-links: {len(errors)} broken link(s) in {nfiles} Markdown files", file=sys.stderr)
        return 1
    if verbose:
        print(f"check-links: {nlinks} relative links in {nfiles} Markdown files, all good")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
