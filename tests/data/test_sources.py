"""Reading the user's data: text, JSONL, ArrayRecord, directories, globs, and the errors."""

import json

import pytest

from nested_jax.data import sources


def test_text_files_split_into_paragraphs(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first para\nline two\n\n\nsecond para\n  \nthird\n")
    docs = sources.load_documents(str(f))
    assert list(docs) == ["first para\nline two", "second para", "third"]


def test_long_paragraphs_are_cut_at_line_ends():
    text = "".join(f"line {i:04d}\n" for i in range(100))
    pieces = sources.split_paragraphs(text, max_chars=100)
    assert "".join(pieces) == text.rstrip("\n")
    assert all(len(p) <= 100 for p in pieces) and len(pieces) > 1


def test_jsonl_with_text_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"text": "a"}, {"body": "x", "text": "b"}, "c"]))
    assert list(sources.load_documents(str(f))) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="data.text_field"):
        sources.load_documents(str(f), text_field="body")


def test_array_record(tmp_path):
    pytest.importorskip("grain")
    module = pytest.importorskip("array_record.python.array_record_module")
    ArrayRecordWriter = module.ArrayRecordWriter

    path = tmp_path / "docs.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for rec in [b"plain text", json.dumps({"text": "from json"}).encode(), "caf\u00e9".encode()]:
        writer.write(rec)
    writer.close()
    assert list(sources.load_documents(str(path))) == ["plain text", "from json", "caf\u00e9"]


def test_directory_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "a.jsonl").write_text('{"text": "ay"}\n')
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    docs = sources.load_documents(str(tmp_path))
    assert sorted(docs) == ["ay", "bee"] and len(docs) == 2
    assert list(sources.load_documents(str(tmp_path / "*.txt"))) == ["bee"]


def test_missing_and_empty_paths_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="data.path=.*no such file"):
        sources.load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="data.path=.*no documents"):
        sources.load_documents(str(tmp_path))
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="data.path=.*no documents"):
        sources.load_documents(str(tmp_path / "blank.txt"))
    with pytest.raises(ValueError, match="data.path=''"):
        sources.load_documents("")


def test_undecodable_text_is_refused_naming_the_file_line_and_offset(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_bytes(b"fine\n\nstill fine\n\xff\xfe bad bytes\n")
    with pytest.raises(sources.DataError, match=rf"{f} has bytes that are not UTF-8 at byte "
                       r"offset 17 \(line 4\).*data.decode_errors=replace"):
        sources.load_documents(str(f))
    docs = sources.load_documents(str(f), decode_errors="replace")
    assert list(docs)[-1] == "still fine\n\ufffd\ufffd bad bytes"


def test_jsonl_with_bad_bytes_names_the_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "a"}\n{"text": "b\xc3"}\n')
    with pytest.raises(sources.DataError, match=rf"{f} has bytes that are not UTF-8 at byte "
                       r"offset \d+ \(line 2\)"):
        sources.load_documents(str(f))


def test_binary_files_are_refused(tmp_path):
    f = tmp_path / "program"
    f.write_bytes(b"#!ok\x00\x01\x02")
    with pytest.raises(sources.DataError, match=r"NUL byte \(binary data\?\) at byte offset 4"):
        sources.load_documents(str(f))
