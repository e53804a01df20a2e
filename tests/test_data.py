"""The data layer: embedded sets load with their official counts; bad rows are counted by reason or raise."""
import csv
import json
import sys
import time
import types
from collections import Counter

import pytest
from PIL import Image

from workbench.assets import asset_path
from workbench.data.captions import CAPTION_PROMPTS, load_captions
from workbench.data.easyvqa import EASY_VQA_ANSWERS, load_easy_vqa, question_type
from workbench.data.emoji import emoji_name, load_emoji_captions
from workbench.data.llava import load_llava_json, save_llava_json
from workbench.data.loaders import DATASETS, load_dataset_spec
from workbench.data.samples import DataReport, Sample, SampleDataset, check_sample
from workbench.errors import ConfigError, ImageError, UnknownComponentError
from workbench.images import load_image


def _png(path, color="red", size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _turns(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# ---------------------------------------------------------------- easy-VQA

@pytest.fixture(scope="module")
def easy_test():
    return load_easy_vqa("test")


def test_easy_vqa_official_counts_fast():
    start = time.perf_counter()
    train = load_easy_vqa("train")
    elapsed = time.perf_counter() - start
    assert len(train) == 38_575 and train.report.total == 38_575 and not train.report.skipped
    assert elapsed < 3, f"easy-VQA train took {elapsed:.2f} s to load"  # ~0.5 s; generous for slow CI


def test_easy_vqa_test_split_and_question_types(easy_test):
    assert len(easy_test) == 9_673
    types_ = Counter(s.meta["question_type"] for s in easy_test)
    assert set(types_) == {"yes/no", "color", "shape"}
    assert 0.72 < types_["yes/no"] / len(easy_test) < 0.76
    sample = easy_test[0]
    assert sample.messages[0]["role"] == "user" and sample.messages[0]["content"].startswith("<image>\n")
    assert sample.messages[1] == {"role": "assistant", "content": sample.meta["answer"]}
    assert sample.images[0].endswith(f"images/{sample.meta['image_id']}.png")
    assert check_sample(sample) is None  # the real file exists and opens
    assert {s.meta["answer"] for s in easy_test} == set(EASY_VQA_ANSWERS)


def test_easy_vqa_answers_match_answers_txt():
    lines = (asset_path("easy-vqa") / "answers.txt").read_text().split()
    assert list(EASY_VQA_ANSWERS) == lines and len(lines) == 13
    assert [question_type(a) for a in ("yes", "no", "teal", "gray", "circle", "triangle")] == \
        ["yes/no", "yes/no", "color", "color", "shape", "shape"]


def test_easy_vqa_limit_is_seeded(easy_test):
    a, b, c = (load_easy_vqa("test", limit=50, seed=s) for s in (1, 1, 2))
    ids = lambda d: [s.meta["id"] for s in d]  # noqa: E731
    assert len(a) == 50 and ids(a) == ids(b) != ids(c)
    assert a.report.used == 50 and "using 50" in a.report.summary()
    with pytest.raises(ConfigError):
        load_easy_vqa("validation")


# ---------------------------------------------------------------- LLaVA JSON

@pytest.fixture()
def llava_dir(tmp_path):
    img = tmp_path / "img"
    _png(img / "a.png")
    _png(img / "b.png", "blue")
    (img / "empty.png").write_bytes(b"")
    (img / "corrupt.png").write_bytes(b"this is not an image at all")
    rows = [
        {"id": "good1", "image": "img/a.png", "conversations": _turns("<image>\nwhat color?", "red")},
        {"id": "good2", "image": ["img/a.png", "img/b.png"],
         "conversations": _turns("<image> vs <image>: same color?", "no")},
        {"id": "good3", "conversations": [{"from": "system", "value": "Be brief."}] + _turns("hi", "hello")},
        {"id": "missing", "image": "img/nope.png", "conversations": _turns("<image>\nwhat?", "x")},
        {"id": "empty-file", "image": "img/empty.png", "conversations": _turns("<image>\nwhat?", "x")},
        {"id": "corrupt", "image": "img/corrupt.png", "conversations": _turns("<image>\nwhat?", "x")},
        {"id": "no-placeholder", "image": "img/a.png", "conversations": _turns("what color?", "red")},
        {"id": "empty-answer", "image": "img/a.png", "conversations": _turns("<image>\nwhat?", "  ")},
        {"id": "no-answer", "image": "img/a.png", "conversations": [{"from": "human", "value": "<image>\nhm"}]},
        "not a row",
        {"id": "no-conv", "image": "img/a.png"},
        {"id": "bad-role", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    return tmp_path, rows


def test_llava_counts_every_bad_row_reason(llava_dir):
    folder, rows = llava_dir
    ds = load_llava_json(folder / "data.json")
    assert [s.meta["id"] for s in ds] == ["good1", "good2", "good3"]
    assert ds.report.total == len(rows) and ds.report.kept == 3
    assert ds.report.skipped == {"missing image": 1, "unreadable image": 2, "placeholder mismatch": 1,
                                 "empty answer": 1, "no answer": 1, "malformed row": 3}
    assert ds.report.examples["placeholder mismatch"] == ["6 (id no-placeholder)"]
    assert ds[1].images == [str(folder / "img/a.png"), str(folder / "img/b.png")]
    assert ds[2].messages[0] == {"role": "system", "content": "Be brief."} and ds[2].images == []
    assert ds[0].meta["answer"] == "red"
    summary = ds.report.summary()
    assert "kept 3 of 12" in summary and "skipped 9" in summary and "unreadable image: 2" in summary
    assert ds.report.as_dict()["skipped"]["malformed row"] == 3


def test_llava_raise_names_row_and_reason(llava_dir):
    folder, _ = llava_dir
    with pytest.raises(ConfigError, match=r"row 3 \(id missing\): missing image"):
        load_llava_json(folder / "data.json", on_error="raise")
    with pytest.raises(ConfigError, match="on_error"):
        load_llava_json(folder / "data.json", on_error="ignore")


def test_llava_image_folder_and_jsonl(llava_dir, tmp_path):
    folder, rows = llava_dir
    lines = [json.dumps(r) for r in rows[:2]] + ["", "{broken json", json.dumps(rows[6])]
    jsonl = tmp_path / "elsewhere" / "data.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("\n".join(lines) + "\n")
    ds = load_llava_json(jsonl, image_folder=folder)
    assert len(ds) == 2 and ds.report.skipped == {"malformed row": 1, "placeholder mismatch": 1}
    without_folder = load_llava_json(jsonl)  # images resolve next to the JSONL, where they are not
    assert len(without_folder) == 0 and without_folder.report.skipped["missing image"] == 2


def test_llava_rejects_non_list_json(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"data": []}))
    with pytest.raises(ConfigError, match="list of rows"):
        load_llava_json(tmp_path / "d.json")


def test_save_and_load_llava_round_trip(tmp_path, llava_dir):
    folder, _ = llava_dir
    samples = [
        Sample([{"role": "user", "content": "<image>\nwhat color?"}, {"role": "assistant", "content": "green"}],
               [Image.new("RGB", (6, 6), "green")], {"id": "pil", "question_type": "color"}),
        Sample([{"role": "user", "content": "<image>\nand this?"}, {"role": "assistant", "content": "red"}],
               [str(folder / "img/a.png")], {"id": "path"}),
        Sample([{"role": "user", "content": "no image"}, {"role": "assistant", "content": "ok"}], [], {}),
    ]
    out = save_llava_json(samples, tmp_path / "mine" / "train.json")
    back = load_llava_json(out)
    assert len(back) == 3 and not back.report.skipped
    assert [s.messages for s in back] == [s.messages for s in samples]
    assert back[0].meta["question_type"] == "color" and back[2].meta["id"] == 2
    assert Image.open(back[0].images[0]).getpixel((0, 0)) == (0, 128, 0)
    assert back[1].images[0].startswith(str(tmp_path / "mine"))  # copied in: the folder is self-contained
    raw = json.loads(out.read_text())
    assert raw[0]["image"].startswith("images/") and raw[0]["conversations"][1] == {"from": "gpt", "value": "green"}
    jsonl = save_llava_json(back, tmp_path / "mine" / "train.jsonl")
    assert [s.messages for s in load_llava_json(jsonl)] == [s.messages for s in samples]


# ---------------------------------------------------------------- captions

def test_captions_from_csv_and_jsonl(tmp_path):
    _png(tmp_path / "cat.png")
    _png(tmp_path / "dog.png")
    with open(tmp_path / "captions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows([["cat.png", "a red square"], ["dog.png", "another one"], ["gone.png", "x"],
                          ["cat.png", ""]])
    ds = load_captions(tmp_path)
    assert len(ds) == 2 and ds.report.skipped == {"missing image": 1, "empty answer": 1}
    s = ds[0]
    assert s.meta["caption"] == "a red square" and s.messages[1]["content"] == "a red square"
    question = s.messages[0]["content"]
    assert question.startswith("<image>\n") and question.split("\n", 1)[1] in CAPTION_PROMPTS
    assert [x.messages for x in load_captions(tmp_path, seed=0)] == [x.messages for x in ds]

    jsonl = tmp_path / "sub" / "captions.jsonl"
    _png(jsonl.parent / "p.png")
    jsonl.write_text(json.dumps({"image": "p.png", "caption": "a dot"}) + "\n{oops\n"
                     + json.dumps({"caption": "no image"}) + "\n")
    ds = load_captions(jsonl, prompts=["Caption it."])
    assert len(ds) == 1 and ds.report.skipped == {"malformed row": 2}
    assert ds[0].messages[0]["content"] == "<image>\nCaption it."
    with pytest.raises(ConfigError, match="row 1"):
        load_captions(jsonl, on_error="raise")


def test_captions_need_the_right_columns(tmp_path):
    (tmp_path / "captions.csv").write_text("file,text\na.png,hi\n")
    with pytest.raises(ConfigError, match="image,caption"):
        load_captions(tmp_path / "captions.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="captions.csv or captions.jsonl"):
        load_captions(tmp_path / "empty")
    with pytest.raises(ConfigError, match="not found"):
        load_captions(tmp_path / "no-such-folder")


# ---------------------------------------------------------------- emoji

def test_emoji_captions_have_names():
    ds = load_emoji_captions()
    assert len(ds) > 3_900 and ds.report.total == 4_009 and set(ds.report.skipped) == {"no name"}
    by_name = {s.meta["name"]: s for s in ds}
    grin = by_name["grinning face"]
    assert grin.meta["emoji"] == "😀" and grin.images[0].endswith("1f600.png")
    assert grin.messages[1] == {"role": "assistant", "content": "grinning face"}
    assert "red heart" in by_name and "flag of Gambia" in by_name
    assert emoji_name("1f1ec-1f1f2")[1] == "flag of Gambia" and emoji_name("e50a") is None
    assert emoji_name("1f3f3-fe0f-200d-1f308")[1] == "rainbow flag"
    assert len(load_emoji_captions(limit=20, seed=3)) == 20


# ---------------------------------------------------------------- shared machinery

def test_check_sample_reasons(tmp_path):
    good = _png(tmp_path / "g.png")
    truncated = tmp_path / "t.png"
    noisy = _png(tmp_path / "n.png", size=(64, 64))
    Image.effect_noise((64, 64), 50).save(noisy)
    truncated.write_bytes(noisy.read_bytes()[:2000])  # header intact, pixels cut: caught at batch time instead

    def sample(images, q="<image>\nq", a="a"):
        return Sample([{"role": "user", "content": q}, {"role": "assistant", "content": a}], images)

    assert check_sample(sample([str(good)])) is None
    assert check_sample(sample([Image.new("RGB", (4, 4))])) is None
    assert check_sample(sample([str(truncated)])) is None
    with pytest.raises(ImageError):
        load_image(truncated)
    assert check_sample(sample([str(tmp_path / "x.png")])) == "missing image"
    assert check_sample(sample([str(good)], q="q")) == "placeholder mismatch"
    assert check_sample(sample([], q="<image> q")) == "placeholder mismatch"
    assert check_sample(sample([str(good)], a="")) == "empty answer"
    assert check_sample(Sample([{"role": "user", "content": "q"}], [])) == "no answer"
    assert check_sample(sample(["x"], q="[img] q"), image_token="[img]") == "missing image"


def test_subset_split_and_report():
    samples = [Sample([{"role": "user", "content": str(i)}, {"role": "assistant", "content": "a"}], [], {"id": i})
               for i in range(10)]
    ds = SampleDataset(samples, DataReport("toy", total=12, kept=10, skipped={"no answer": 2}))
    train, val = ds.split(0.2, seed=0)
    assert len(train) == 8 and len(val) == 2
    assert {s.meta["id"] for s in train} | {s.meta["id"] for s in val} == set(range(10))
    assert [s.meta["id"] for s in ds.split(0.2, seed=0)[1]] == [s.meta["id"] for s in val]
    assert len(ds.subset(3, seed=1)) == 3 and len(ds.subset(None)) == 10 and len(ds.subset(99)) == 10
    assert isinstance(ds[0], Sample) and ds.report.used is None
    assert "skipped 2 (no answer: 2)" in ds.report.summary() and "using 8" in train.report.summary()
    with pytest.raises(ConfigError):
        ds.split(1.5)


def test_load_dataset_spec_registry(tmp_path):
    with pytest.raises(UnknownComponentError) as info:
        load_dataset_spec("imagenet")
    for kind in ("easy-vqa", "llava", "captions", "emoji-captions", "hf"):
        assert kind in str(info.value)
    assert DATASETS.info("easy-vqa")["offline"] is True and DATASETS.info("hf")["offline"] is False
    assert all(DATASETS.info(k)["description"] for k in DATASETS.names())
    assert len(load_dataset_spec("easy-vqa", split="test", limit=5)) == 5
    with pytest.raises(ConfigError, match="It takes: split"):
        load_dataset_spec("easy-vqa", splitt="test")


# ---------------------------------------------------------------- Hugging Face datasets (optional library)

def test_hf_without_datasets_library_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if it were not installed
    with pytest.raises(ConfigError, match="pip install datasets"):
        load_dataset_spec("hf", name_or_path="some/dataset")


class _FakeTable(list):
    """The slice of datasets.Dataset that load_hf_dataset uses: rows as dicts, column_names, select."""

    @property
    def column_names(self):
        return list(self[0])

    def select(self, indices):
        return _FakeTable(self[i] for i in indices)


def test_hf_rows_become_samples(monkeypatch, tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text("{}")
    table = _FakeTable([{"image": Image.new("RGB", (4, 4)), "q": "what?", "a": "red", "cap": "a thing"},
                        {"image": None, "q": "what?", "a": "blue", "cap": "x"},
                        {"image": Image.new("RGB", (4, 4)), "q": "<image> is it?", "a": "", "cap": "y"}])
    fake = types.SimpleNamespace(load_from_disk=lambda path: {"train": table},
                                 load_dataset=lambda *a, **k: pytest.fail("a saved folder loads from disk"))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ds = load_dataset_spec("hf", name_or_path=str(saved), question_column="q", answer_column="a")
    assert len(ds) == 1 and ds.report.skipped == {"missing image": 1, "empty answer": 1}
    assert ds[0].messages[0]["content"] == "<image>\nwhat?" and isinstance(ds[0].images[0], Image.Image)
    caps = load_dataset_spec("hf", name_or_path=str(saved), caption_column="cap", limit=2, seed=0)
    assert len(caps) + sum(caps.report.skipped.values()) == 2
    with pytest.raises(ConfigError, match="no split 'test'"):
        load_dataset_spec("hf", name_or_path=str(saved), split="test", caption_column="cap")
    with pytest.raises(ConfigError, match="Columns in"):
        load_dataset_spec("hf", name_or_path=str(saved))


def test_hf_hub_name_offline_raises(monkeypatch):
    from workbench.errors import OfflineError

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace())
    monkeypatch.setenv("WORKBENCH_OFFLINE", "1")
    with pytest.raises(OfflineError, match="easy-vqa"):
        load_dataset_spec("hf", name_or_path="someone/some-vqa", caption_column="text")


def test_hf_save_to_disk_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4), "red")] * 3,
                                        "caption": ["red", "red square", "a red thing"]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "caption": datasets.Value("string")}))
    table.save_to_disk(str(tmp_path / "saved"))
    ds = load_dataset_spec("hf", name_or_path=str(tmp_path / "saved"), caption_column="caption")
    assert len(ds) == 3 and ds[1].meta["caption"] == "red square" and isinstance(ds[0].images[0], Image.Image)


def test_hf_local_image_folder_with_questions(tmp_path):
    """A folder laid out as the hub's imagefolder (images + metadata.jsonl) loads through the real `datasets`
    code path that hub names take, without any network."""
    pytest.importorskip("datasets")
    folder = tmp_path / "vqa" / "train"
    folder.mkdir(parents=True)
    rows = [("red.png", "red", "What colour is it?", "red"), ("blue.png", "blue", "What colour is it?", "blue")]
    with open(folder / "metadata.jsonl", "w") as f:
        for name, colour, question, answer in rows:
            Image.new("RGB", (8, 8), colour).save(folder / name)
            f.write(json.dumps({"file_name": name, "question": question, "answer": answer}) + "\n")
    ds = load_dataset_spec("hf", name_or_path=str(tmp_path / "vqa"), split="train", question_column="question",
                           answer_column="answer")
    assert len(ds) == 2 and ds.report.num_skipped == 0
    assert sorted(s.meta["answer"] for s in ds) == ["blue", "red"]
    assert all(isinstance(s.images[0], Image.Image) for s in ds)
    with pytest.raises(ConfigError, match="no split 'test'"):
        load_dataset_spec("hf", name_or_path=str(tmp_path / "vqa"), split="test", question_column="question",
                          answer_column="answer")


def test_image_paths_stay_inside_the_dataset_folder(tmp_path):
    """A data file cannot make the workbench open files elsewhere on the machine: `..`, absolute paths and
    symlinks that point out are skipped and counted, unless the loader is told to allow absolute paths."""
    from workbench.data.captions import load_captions
    from workbench.data.samples import OUTSIDE_FOLDER
    from workbench.data.table import load_image_table

    outside = tmp_path / "secret.png"
    _png(outside)
    data = tmp_path / "data"
    _png(data / "ok.png")
    (data / "link.png").symlink_to(outside)
    names = ["ok.png", "../secret.png", "../../../../etc/passwd", str(outside), "link.png", "sub/../ok.png"]
    rows = [{"id": str(i), "image": n, "conversations": _turns("<image>\nwhat color?", "red")}
            for i, n in enumerate(names)]
    (data / "data.json").write_text(json.dumps(rows))
    ds = load_llava_json(data / "data.json")
    assert [s.meta["id"] for s in ds] == ["0", "5"]
    assert ds.report.skipped == {OUTSIDE_FOLDER: 4}
    opened = load_llava_json(data / "data.json", allow_absolute_paths=True)
    assert str(outside) in [im for s in opened for im in s.images]  # the explicit opt-out reads it

    (data / "captions.csv").write_text("image,caption\n" + "".join(f"{n},a red shape\n" for n in names))
    assert load_captions(data).report.skipped == {OUTSIDE_FOLDER: 4}
    (data / "table.csv").write_text("image,question,answer\n" + "".join(f"{n},what color?,red\n" for n in names))
    table = load_image_table(data / "table.csv")
    assert len(table) == 2 and table.report.skipped == {OUTSIDE_FOLDER: 4}
