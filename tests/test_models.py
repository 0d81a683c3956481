"""Students and teachers from local weights: checkpoints of ``ffcv-dr train``
or timm's train.py load with their own number of classes, and anything else
is refused with the file named."""
import pytest
import torch

from ffcv_dr.models import create
from ffcv_dr.teachers import load_teacher


def images(n=4, side=40):
    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('key', ['model', 'state_dict', None])
def test_checkpoints_load_with_their_own_classes(tmp_path, key):
    trained = create('test_efficientnet', num_classes=7, input_size=32).eval()
    state = trained.net.state_dict()
    path = str(tmp_path / 'weights.pt')
    torch.save({key: state, 'epoch': 3} if key else state, path)
    loaded = create('test_efficientnet', checkpoint=path, input_size=32).eval()
    with torch.no_grad():
        want, got = trained(images()), loaded(images())
    assert got.shape == (4, 7)
    torch.testing.assert_close(got, want)
    teacher = load_teacher('test_efficientnet', [path], input_size=32)
    torch.testing.assert_close(teacher(images()), want.softmax(-1))


def test_bundled_model_fine_tunes_from_the_packages_weights(tmp_path):
    pretrained = create('bundled:efficientnet_lite0', pretrained=True)
    student = create('bundled:efficientnet_lite0', num_classes=10, pretrained=True, input_size=64)
    assert student.net._fc.out_features == 10 and student.input_size == 64
    body = {k: v for k, v in pretrained.net.state_dict().items() if not k.startswith('_fc.')}
    for k, v in body.items():
        assert torch.equal(student.net.state_dict()[k], v), k
    path = str(tmp_path / 'checkpoint.pt')
    torch.save({'model': student.net.state_dict()}, path)
    teacher = load_teacher('bundled:efficientnet_lite0', [path], input_size=64)
    with torch.no_grad():
        torch.testing.assert_close(teacher(images()), student.eval()(images()).softmax(-1))


def test_foreign_or_unsafe_checkpoints_are_refused(tmp_path):
    other = str(tmp_path / 'resnet.pt')
    torch.save({'model': create('resnet18', num_classes=3).net.state_dict()}, other)
    with pytest.raises(ValueError, match=f'{other}: no classifier.weight, so not weights of test_efficientnet'):
        create('test_efficientnet', checkpoint=other)
    wrong = str(tmp_path / 'wrong.pt')
    state = create('test_efficientnet', num_classes=3).net.state_dict()
    state['conv_stem.weight'] = torch.zeros(1)
    torch.save(state, wrong)
    with pytest.raises(ValueError, match=f'{wrong}: not weights of test_efficientnet'):
        create('test_efficientnet', checkpoint=wrong)
    code = str(tmp_path / 'code.pt')
    torch.save({'model': print}, code)  # a pickled callable: weights_only refuses it
    with pytest.raises(ValueError, match=f'{code}: not a readable weights checkpoint'):
        create('test_efficientnet', checkpoint=code)
    with pytest.raises(ValueError, match='takes no model settings'):
        create('bundled:efficientnet_lite0', drop_path_rate=0.1)


def test_a_hub_model_that_cannot_be_fetched_fails_at_once_naming_the_ways_out(monkeypatch):
    """Offline, huggingface_hub retries each file for about a minute; here the
    hub is asked once (a closed local port stands for it) and the error says
    what to do instead."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    with pytest.raises(ValueError, match=r'model efficientnet_lite0: its pretrained weights are not in the '
                                         r'local cache and the hub cannot be reached .*--no-pretrained'):
        create('efficientnet_lite0', pretrained=True)
    assert constants.HF_HUB_OFFLINE is False   # offline for that call only
