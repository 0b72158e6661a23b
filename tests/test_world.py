import numpy as np
import pytest

from edgesafe.zoo.tiny_shapes import world
from edgesafe.zoo.tiny_shapes.tokenizer import check_word_level, write_tokenizer


def test_render_is_seeded_and_in_range():
    a = world.Attributes("star", "red", "checkerboard")
    x = world.render(a, np.random.default_rng(1))
    assert x.shape == (32, 32, 3) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert np.array_equal(x, world.render(a, np.random.default_rng(1)))
    assert not np.array_equal(x, world.render(a, np.random.default_rng(2)))


def test_object_pixels_carry_the_colour():
    img = world.render(world.Attributes("square", "blue", "plain"), np.random.default_rng(0))
    bluest = img.reshape(-1, 3)[np.argmax(img.reshape(-1, 3)[:, 2] - img.reshape(-1, 3)[:, 0])]
    assert bluest[2] > 0.7 and bluest[0] < 0.3


def test_fine_tuning_split_excludes_unwanted_concepts():
    _, captions, labels = world.sample_batch(300, np.random.default_rng(0), exclude=tuple(world.UNWANTED))
    words = {w for c in captions for w in c.split()}
    for concept in world.UNWANTED.values():
        assert not words & set(concept.unlearn_words + concept.paraphrase_words)
    assert world.HEADS["object"].index("star") not in labels[:, 0]
    assert world.HEADS["style"].index("checkerboard") not in labels[:, 2]


def test_oversampling_raises_the_share_of_the_named_values():
    def shares(**kw):
        _, _, labels = world.sample_batch(3000, np.random.default_rng(5), **kw)
        return (np.mean(labels[:, 0] == world.HEADS["object"].index("star")),
                np.mean(labels[:, 2] == world.HEADS["style"].index("checkerboard")))

    star, checker = shares()
    assert abs(star - 0.2) < 0.03 and abs(checker - 0.2) < 0.03
    # weights 9 (both), 3 (one), 1 (neither): each value's share is (6*9 + 24*3) / 294
    star, checker = shares(oversample=("star", "checkerboard"), factor=3.0)
    assert abs(star - 126 / 294) < 0.03 and abs(checker - 126 / 294) < 0.03


def test_paraphrase_words_are_held_out_from_unlearning_prompts():
    for name, concept in world.UNWANTED.items():
        direct = " ".join(p.text for p in world.concept_prompts(name))
        para = world.concept_prompts(name, paraphrase=True)
        assert para and all(any(w in p.text.split() for w in concept.paraphrase_words) for p in para)
        assert not set(direct.split()) & set(concept.paraphrase_words)
        # the teacher did see the paraphrase words in training
        assert set(concept.paraphrase_words) <= set(world.WORDS[concept.head][concept.value])


def test_prompt_sets():
    wanted = world.wanted_prompts()
    assert len(wanted) == 4 * 6 * 4
    assert all(p.object != "star" and p.style != "checkerboard" for p in wanted)


def test_tokenizer_is_word_level(tmp_path):
    tok = write_tokenizer(world.vocabulary(), tmp_path)
    assert check_word_level(tok, world.vocabulary()) == []
    ids = tok("a red pentagram on a chessboard background").input_ids
    assert len(ids) == 2 + 7
    # words outside the world still tokenize, as characters
    assert len(tok.tokenize("zebra")) > 1


@pytest.mark.parametrize("name", list(world.UNWANTED))
def test_concept_prompts_name_the_concept(name):
    concept = world.UNWANTED[name]
    for p in world.concept_prompts(name):
        assert getattr(p, concept.head) == concept.value


def test_zoo_data_leaves_out_what_the_recipes_concepts_name():
    """The data, wanted prompts and real images of a zoo recipe exclude the values its own concepts name, not the
    world's list: a recipe that suppresses only stars keeps checkerboards in its data."""
    from edgesafe.data import Batches, wanted_prompts
    from edgesafe.recipe import load_recipe

    shapes = load_recipe("recipes/tiny-shapes.yaml")
    only_star = load_recipe("recipes/tiny-shapes.yaml", overrides={"concepts": [shapes.concepts[1].model_dump()]})
    assert world.values_named([c.target for c in only_star.concepts]) == ("star",)
    assert world.values_named(["a red star on a chessboard"]) == ("star", "red", "checkerboard")
    for recipe, kept in ((shapes, set()), (only_star, {"checkerboard"})):
        labels = set()
        batches = Batches(recipe, batch_size=64, resolution=32, seed=0)
        for step in range(5):
            labels |= {w for c in batches(step)[1] for w in c.split()}
        prompts = " ".join(wanted_prompts(recipe)).split()
        for value in ("star", "checkerboard"):
            present = bool(set(world.WORDS["object" if value == "star" else "style"][value]) & labels)
            assert present == (value in kept), (recipe.concepts, value)
            assert bool(set(world.WORDS["object" if value == "star" else "style"][value]) & set(prompts)) == (
                value in kept)


def test_bench_wanted_prompts_sets_how_many_of_a_zoo_worlds_prompts_the_bench_spreads_through():
    from edgesafe.data import wanted_prompts
    from edgesafe.recipe import load_recipe

    every = wanted_prompts(load_recipe("recipes/tiny-shapes.yaml"))
    some = wanted_prompts(load_recipe("recipes/tiny-shapes.yaml", overrides={"bench.wanted_prompts": 24}))
    assert len(every) == 96 and len(some) == 24 and set(some) < set(every)
    assert {world.parse_prompt(p).object for p in some} == set(world.OBJECTS) - {"star"}
    assert {world.parse_prompt(p).colour for p in some} - {None} == set(world.COLOURS)
