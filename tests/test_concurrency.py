"""No hidden process-wide state: generators and plain Hugging Face calls on one target in two
threads give what each gives alone, the target is unchanged afterwards, and repeated calls do
not grow memory."""
import threading

import torch

import jakiro
from jakiro.testing import make_prompts, make_target_and_draft, single_thread


def in_threads(*calls):
    """Runs the calls at once, each in its own thread, several times over; returns the last results."""
    results, errors = [None] * len(calls), []
    start = threading.Barrier(len(calls))

    def run(index, call):
        try:
            start.wait()
            for _ in range(3):
                results[index] = call()
        except Exception as error:          # surfaced in the main thread
            errors.append(error)
    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads), "a generation thread hung"
    return results


def setup(seed=0):
    model, draft = make_target_and_draft("llama", "jakiro", "cpu", rigged=True, seed=seed)
    ids, mask, _ = make_prompts(2, model.config.vocab_size, 3, 9, torch.Generator().manual_seed(seed))
    return model, draft, ids, mask


def test_two_generators_and_vanilla_in_threads_equal_their_sequential_outputs():
    model, draft, ids, mask = setup()
    first = jakiro.SpeculativeGenerator(model, draft, depth=3, top_k=4, total_tokens=16)
    second = jakiro.SpeculativeGenerator(model, draft, depth=2, top_k=3, total_tokens=8)
    calls = [lambda: first.generate(ids, mask, max_new_tokens=24).sequences,
             lambda: second.generate(ids, mask, max_new_tokens=24).sequences,
             lambda: jakiro.vanilla_generate(model, ids, mask, max_new_tokens=24).sequences]
    with single_thread():
        alone = [call() for call in calls]
    together = in_threads(*calls)
    for got, expected in zip(together, alone):
        assert torch.equal(got, expected)
    assert torch.equal(alone[0], alone[2]) and torch.equal(alone[1], alone[2])   # lossless, too


def test_hugging_face_generate_beside_jakiro_gives_what_it_gives_alone():
    model, draft, ids, mask = setup(seed=3)
    implementation = model.config._attn_implementation
    row = ids[1:, :]

    def hf():
        return model.generate(row, attention_mask=mask[1:], do_sample=False, max_new_tokens=20, pad_token_id=0)
    before = hf()
    generator = jakiro.SpeculativeGenerator(model, draft, depth=3, top_k=4, total_tokens=16)
    hf_result, _ = in_threads(hf, lambda: generator.generate(ids, mask, max_new_tokens=24))
    assert torch.equal(hf_result, before)
    assert torch.equal(hf(), before)                                   # and after jakiro is done
    assert model.config._attn_implementation == implementation
    assert all("forward" not in vars(module) for module in model.modules())


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_repeated_generate_calls_do_not_grow_memory():
    model, draft, ids, mask = setup(seed=5)
    generator = jakiro.SpeculativeGenerator(model, draft, depth=3, top_k=4, total_tokens=16)
    with single_thread():
        for _ in range(20):                                            # warm-up: allocator pools, caches
            generator.generate(ids, mask, max_new_tokens=8)
            jakiro.vanilla_generate(model, ids, mask, max_new_tokens=8)
        before = resident_bytes()
        for _ in range(200):
            generator.generate(ids, mask, max_new_tokens=8)
            jakiro.vanilla_generate(model, ids, mask, max_new_tokens=8)
        grown = resident_bytes() - before
    assert grown < 16 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over 200 calls"
