"""Reading a job's output file as lines: complete lines only, resumable, bounded in length."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.runner.backend import MAX_LINE, FileTail


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "stdout"


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_missing_file_gives_no_lines(out: Path) -> None:
    tail = FileTail(out)
    assert tail.read(final=False) == []
    assert tail.read(final=True) == []
    assert tail.offset == 0


def test_only_complete_lines_until_final(out: Path) -> None:
    append(out, b"one\ntwo\nthr")
    tail = FileTail(out)
    assert tail.read(final=False) == ["one", "two"]
    assert tail.read(final=False) == []
    append(out, b"ee\nfou")
    assert tail.read(final=False) == ["three"]
    assert tail.read(final=True) == ["fou"]
    assert tail.read(final=True) == []
    assert tail.offset == out.stat().st_size


def test_partial_line_alone_waits_for_its_newline(out: Path) -> None:
    append(out, b"working")
    tail = FileTail(out)
    assert tail.read(final=False) == []
    append(out, b"... done\n")
    assert tail.read(final=False) == ["working... done"]


def test_empty_lines_are_kept(out: Path) -> None:
    append(out, b"a\n\n\nb\n")
    assert FileTail(out).read(final=False) == ["a", "", "", "b"]


def test_final_read_of_terminated_output_adds_no_empty_line(out: Path) -> None:
    append(out, b"a\nb\n")
    assert FileTail(out).read(final=True) == ["a", "b"]


def test_resuming_from_an_offset_neither_repeats_nor_loses(out: Path) -> None:
    expected = [f"line {i}" for i in range(50)]
    seen: list[str] = []
    offset = 0
    for i in range(0, 50, 7):
        append(out, b"".join(f"{line}\n".encode() for line in expected[i : i + 7]))
        tail = FileTail(out, offset=offset)  # a restarted runner reads from its recorded offset
        seen += tail.read(final=False)
        offset = tail.offset
    assert seen == expected


def test_resuming_in_the_middle_of_an_unterminated_line(out: Path) -> None:
    append(out, b"first\nsec")
    tail = FileTail(out)
    assert tail.read(final=False) == ["first"]
    append(out, b"ond\nthird")
    resumed = FileTail(out, offset=tail.offset)
    assert resumed.read(final=False) == ["second"]
    assert FileTail(out, offset=resumed.offset).read(final=True) == ["third"]


def test_reads_bounded_by_limit_still_deliver_everything(out: Path) -> None:
    expected = [f"{i:04d}" + "y" * 20 for i in range(200)]
    append(out, b"".join(f"{line}\n".encode() for line in expected))
    tail = FileTail(out)
    seen: list[str] = []
    for _ in range(1000):
        got = tail.read(final=True, limit=100)
        if not got:
            break
        seen += got
    assert seen == expected


def test_long_line_is_cut_into_pieces(out: Path) -> None:
    line = b"a" * MAX_LINE + b"b" * MAX_LINE + b"c" * 10
    append(out, line + b"\nnext\n")
    assert FileTail(out).read(final=False) == [
        "a" * MAX_LINE,
        "b" * MAX_LINE,
        "c" * 10,
        "next",
    ]


def test_long_unterminated_line_is_delivered_before_its_newline(out: Path) -> None:
    append(out, b"z" * (MAX_LINE + 5))
    tail = FileTail(out)
    assert tail.read(final=False) == ["z" * MAX_LINE]
    assert tail.read(final=False) == []  # the 5 remaining bytes wait for their newline
    append(out, b"\n")
    assert tail.read(final=False) == ["zzzzz"]


def test_newline_after_a_full_piece_adds_no_empty_line(out: Path) -> None:
    append(out, b"q" * MAX_LINE)
    tail = FileTail(out)
    assert tail.read(final=False) == ["q" * MAX_LINE]
    append(out, b"\nafter\n")
    assert tail.read(final=False) == ["after"]


def test_crlf_line_endings_are_stripped(out: Path) -> None:
    append(out, b"dos\r\nunix\nlast\r\n")
    assert FileTail(out).read(final=False) == ["dos", "unix", "last"]


def test_crlf_split_across_reads(out: Path) -> None:
    append(out, b"dos\r")
    tail = FileTail(out)
    assert tail.read(final=False) == []
    append(out, b"\n")
    assert tail.read(final=False) == ["dos"]


def test_lone_carriage_return_inside_a_line_is_kept(out: Path) -> None:
    append(out, b"progress 10%\rprogress 20%\n")
    assert FileTail(out).read(final=False) == ["progress 10%\rprogress 20%"]


def test_invalid_utf8_is_replaced_not_fatal(out: Path) -> None:
    append(out, "ünï\n".encode() + b"\xff\xfe bad\n")
    assert FileTail(out).read(final=False) == ["ünï", "\ufffd\ufffd bad"]
