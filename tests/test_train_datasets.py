"""The Trainer takes data as Hugging Face users hold it: a datasets.Dataset or a DatasetDict with its own splits."""
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from train_fixtures import CLASSES, labelled_texts, random_texts

from laet_fast.train.config import TrainConfig
from laet_fast.train.trainer import Trainer


class _Model:  # the Trainer reads only the config's name before fit()
    config = type("Config", (), {"_name_or_path": "m", "model_type": "llama"})()


def _classified(count, seed):
    texts, labels = labelled_texts(count, seed)
    features = Features({"text": Value("string"), "label": ClassLabel(names=sorted(CLASSES))})
    return Dataset.from_dict({"text": texts, "label": [sorted(CLASSES).index(x) for x in labels]}, features=features)


def test_a_dataset_dict_brings_its_train_and_validation_splits_and_class_names(tmp_path):
    splits = DatasetDict(train=_classified(20, 0), validation=_classified(6, 1), test=_classified(8, 2))
    trainer = Trainer(_Model(), None, TrainConfig(out=str(tmp_path)), splits)
    texts, labels = labelled_texts(20, 0)
    assert trainer.train_data.texts == texts and trainer.classes == sorted(CLASSES)
    assert [trainer.classes[i] for i in trainer.train_data.labels] == labels  # ClassLabel ids read as names
    assert trainer.eval_data.texts == labelled_texts(6, 1)[0]
    only_test = DatasetDict(train=_classified(20, 0), test=_classified(8, 2))
    assert Trainer(_Model(), None, TrainConfig(out=str(tmp_path)), only_test).eval_data.texts == \
        labelled_texts(8, 2)[0]
    given = Trainer(_Model(), None, TrainConfig(out=str(tmp_path)), splits, _classified(4, 3))
    assert given.eval_data.texts == labelled_texts(4, 3)[0]  # an explicit eval_data wins


def test_datasets_for_lm_and_sft_and_the_errors_name_the_fix(tmp_path):
    texts = random_texts(10, 0)
    trainer = Trainer(_Model(), None, TrainConfig(task="lm", method="last", k=1, out=str(tmp_path)),
                      Dataset.from_dict({"text": texts}), Dataset.from_dict({"text": texts[:3]}))
    assert trainer.train_data.texts == texts and trainer.train_data.labels is None
    rows = [{"prompt": t, "completion": t} for t in texts]
    sft = Trainer(_Model(), None, TrainConfig(task="sft", method="last", k=1, out=str(tmp_path)),
                  DatasetDict(train=Dataset.from_list(rows), validation=Dataset.from_list(rows[:2])))
    assert sft.train_data.texts == rows and sft.eval_data.texts == rows[:2]
    with pytest.raises(ValueError, match="no text column 'text'.*rename_column"):
        Trainer(_Model(), None, TrainConfig(out=str(tmp_path)), Dataset.from_dict({"sentence": texts}))
    with pytest.raises(ValueError, match="no 'train' split"):
        Trainer(_Model(), None, TrainConfig(out=str(tmp_path)), DatasetDict(validation=_classified(4, 0)))
    with pytest.raises(ValueError, match="no label column 'label'; columns found: 'text'"):
        Trainer(_Model(), None, TrainConfig(out=str(tmp_path)), Dataset.from_dict({"text": texts}))
