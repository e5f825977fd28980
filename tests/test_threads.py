import multiprocessing

import torch

from kdlib import batching, threads
from tests.helpers import demo_splits, fit_one_epoch, tiny_classifier


def _train_then_leave(share: threads.Share, seen) -> None:
    with threads.joined(share):
        seen.value = torch.get_num_threads()


def test_a_process_takes_the_threads_its_share_s_other_process_no_longer_trains_with():
    before = torch.get_num_threads()
    share = threads.Share.of(2, 2)
    try:
        with threads.joined(share):
            assert torch.get_num_threads() == 1  # two processes training: one thread each
            seen = multiprocessing.get_context("spawn").Value("i", 0)
            other = multiprocessing.get_context("spawn").Process(target=_train_then_leave, args=(share, seen))
            other.start()
            other.join()
            assert other.exitcode == 0 and seen.value == 1  # the other process trained with its part, then left
            threads.take_part()
            assert torch.get_num_threads() == 2
            threads.rest()
            threads.rest()  # resting twice counts once
            assert share.training.value == 0
            threads.resume()
            assert share.training.value == 1
        assert share.training.value == 0  # leaving, it rests
        threads.take_part()  # outside a share: nothing changes
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_training_takes_the_freed_threads_between_steps(tmp_path, capsys):
    before = torch.get_num_threads()
    splits = demo_splits(max_train=400)
    clf = tiny_classifier(splits.train.texts)
    encoded = batching.encode(splits.train, clf.tokenizer, 64, tmp_path)
    share = threads.Share.of(2, 2)
    seen = []
    try:
        with threads.joined(share):
            fit_one_epoch(clf, encoded, on_epoch_end=lambda epoch, metrics: seen.append(torch.get_num_threads()))
            share.count(-1)  # as another process of the share does when it has no trial left
            fit_one_epoch(clf, encoded, on_epoch_end=lambda epoch, metrics: seen.append(torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]
    assert "threads: this process trains on 2 of the 2 threads now (1 of its sweep's processes training)" in capsys.readouterr().out
