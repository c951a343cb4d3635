import pytest
import torch

from moe_align.ops.moe_align_block_size import moe_align_block_size
from oracle_routing import align_oracle
from conftest import requires_cuda

CPU_BACKENDS = ["cpp", "torch"]


def random_ids(num_tokens, top_k, num_experts, generator=None, skip=()):
    """Each token picks top_k distinct experts, never one of `skip`."""
    allowed = torch.tensor([e for e in range(num_experts) if e not in skip])
    keys = torch.rand(num_tokens, allowed.numel(), generator=generator)
    return allowed[keys.topk(top_k, dim=1).indices].to(torch.int32)


def check(topk_ids, num_experts, block_size):
    got = moe_align_block_size(topk_ids, num_experts, block_size)
    want = align_oracle(topk_ids.cpu(), num_experts, block_size)
    for g, w, name in zip(got, want, ("sorted_token_ids", "expert_ids", "num_tokens_post_padded")):
        assert g.dtype == torch.int32, name
        assert torch.equal(g.cpu(), w), name


CASES = [
    # (tokens, top_k, experts, block_size)
    (0, 2, 8, 16),
    (1, 1, 1, 1),
    (1, 6, 64, 16),  # far more experts than pairs
    (37, 3, 7, 4),
    (100, 6, 64, 64),
    (333, 8, 256, 16),
    (17, 2, 5, 1),
    (64, 8, 512, 64),
    (50, 4, 1000, 8),
]


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("tokens,top_k,experts,block_size", CASES)
def test_matches_oracle(backend, backend_name, tokens, top_k, experts, block_size):
    backend(backend_name)
    g = torch.Generator().manual_seed(tokens * 1000 + experts)
    check(random_ids(tokens, top_k, experts, g), experts, block_size)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_edge_layouts(backend, backend_name):
    backend(backend_name)
    # Every token on one expert; the other experts empty.
    check(torch.full((40, 1), 3, dtype=torch.int32), 8, 16)
    # Experts 0, 2 and the last receive nothing.
    g = torch.Generator().manual_seed(0)
    check(random_ids(29, 2, 9, g, skip=(0, 2, 8)), 9, 4)
    # Counts exactly a multiple of the block size.
    check(torch.arange(32, dtype=torch.int32).remainder(4).reshape(16, 2), 4, 8)


@pytest.fixture
def two_threads():
    """Two intra-op threads, so that the C++ kernel cuts inputs of 2 x 2**18 pairs or more in two
    chunks (one per thread): the multi-chunk scan and scatter run on any machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_more_than_64k_pairs(backend, backend_name):
    backend(backend_name)
    g = torch.Generator().manual_seed(1)
    ids = random_ids(9000, 8, 256, g)  # 72000 pairs
    check(ids, 256, 64)


def test_two_chunks_of_the_cpp_kernel(backend, two_threads):
    backend("cpp")
    g = torch.Generator().manual_seed(11)
    ids = random_ids(66000, 8, 256, g, skip=(5,))  # 528000 pairs: two chunks; expert 5 unused
    check(ids, 256, 64)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_int64_and_strided_ids(backend, backend_name):
    backend(backend_name)
    g = torch.Generator().manual_seed(2)
    ids = random_ids(31, 4, 12, g).long()
    check(ids, 12, 8)
    strided = random_ids(4, 31, 40, g).t()  # [31, 4], not contiguous
    assert not strided.is_contiguous()
    before = strided.clone()
    check(strided, 40, 8)
    assert torch.equal(strided, before)


def test_backends_agree_bitwise(backend):
    g = torch.Generator().manual_seed(3)
    ids = random_ids(1000, 6, 64, g)
    backend("cpp")
    native = moe_align_block_size(ids, 64, 16)
    backend("torch")
    reference = moe_align_block_size(ids, 64, 16)
    for a, b in zip(native, reference):
        assert torch.equal(a, b)


def test_opcheck():
    g = torch.Generator().manual_seed(4)
    for args in [(random_ids(23, 3, 10, g), 10, 4), (random_ids(0, 2, 4, g), 4, 16)]:
        torch.library.opcheck(torch.ops.moe_align.moe_align_block_size.default, args)


def test_compiles_fullgraph():
    g = torch.Generator().manual_seed(5)
    ids = random_ids(20, 2, 6, g)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layout(x):
        return moe_align_block_size(x, 6, 8)

    for a, b in zip(layout(ids), align_oracle(ids, 6, 8)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(4, 2), 4, 8), "int32 or int64"),
        ((torch.zeros(8, dtype=torch.int32), 4, 8), "2-D"),
        ((torch.tensor([[0, 4]], dtype=torch.int32), 4, 8), "outside"),
        ((torch.tensor([[-1, 0]], dtype=torch.int32), 4, 8), "outside"),
        ((torch.zeros(2, 2, dtype=torch.int32), 0, 8), "num_experts"),
        ((torch.zeros(2, 2, dtype=torch.int32), 4, 0), "block_size"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises((TypeError, ValueError), match=match):
        moe_align_block_size(*args)


@requires_cuda
@pytest.mark.parametrize("tokens,top_k,experts,block_size", CASES + [(4096, 8, 256, 64), (20000, 8, 256, 64)])
def test_cuda_matches_oracle(tokens, top_k, experts, block_size):
    g = torch.Generator().manual_seed(tokens + experts)
    check(random_ids(tokens, top_k, experts, g).cuda(), experts, block_size)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_out_of_range_ids_name_the_entry_in_every_backend(backend, backend_name, two_threads):
    backend(backend_name)
    ids = torch.zeros(270000, 2, dtype=torch.int32)  # two chunks of the C++ counting pass
    ids[201234, 1] = 9  # in the second
    with pytest.raises(ValueError, match="outside") as info:
        moe_align_block_size(ids, 9, 64)
    if backend_name == "cpp":
        assert "topk_ids[201234, 1] = 9" in str(info.value)
    # an int64 id that would wrap into range as int32 is still an error
    wrapping = torch.tensor([[0, 2**32 + 3]], dtype=torch.int64)
    with pytest.raises(ValueError, match="outside"):
        moe_align_block_size(wrapping, 8, 4)
