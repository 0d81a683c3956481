"""The recipe's one home: the recipe string's parser and the names it gives,
and ml-dr's config read into the same recipe that ffcv-dr writes it from."""
import pytest

from ffcv_dr.mldr.export import write_mldr_config
from ffcv_dr.format import RECIPES, Recipe, RecipeParts, parse_recipe, recipe_name
from ffcv_dr.mldr import CONFIG_LIMITS, load_pickle, recipe_from_config


@pytest.mark.parametrize('name', RECIPES)
def test_recipe_strings_round_trip(name):
    parts = parse_recipe(name)
    assert recipe_name(parts) == name
    recipe = Recipe(num_samples=4, topk=3, num_classes=10, ra_ops=2 if parts.ra else 0,
                    erase=parts.erase, mixing=parts.mixing)
    assert recipe_name(recipe) == name


def test_the_parts_are_read_not_guessed():
    assert parse_recipe('rrc+ra+re+mix') == RecipeParts(ra=True, erase=True, mixing=True)
    assert parse_recipe('rrc+re') == RecipeParts(ra=False, erase=True, mixing=False)  # ml-dr allows it
    for bad in ['', 'ra', 'rrc+re+ra', 'rrc+ra+ra', 'rrc+x', 'rrc+', 'rrc+mixup', 'RRC']:
        with pytest.raises(ValueError, match='is not rrc\\[\\+ra\\]\\[\\+re\\]\\[\\+mix\\]'):
            parse_recipe(bad)


def test_ml_dr_configs_round_trip(tmp_path):
    """A recipe written as an ml-dr config (as ``bench`` does) reads back the same,
    every non-default value included."""
    recipe = Recipe(num_samples=5, topk=4, num_classes=100, ra_ops=3, erase=True, size=160,
                    scale=(0.35, 1.0), ratio=(0.5, 2.0), ra_magnitude=12, erase_p=0.4)
    path = write_mldr_config(recipe, str(tmp_path))
    config = load_pickle(open(path, 'rb').read(), path, CONFIG_LIMITS)
    assert recipe_from_config(config, path, 100) == recipe
