"""Bad input to subtb_loss and modified_subtb_loss: a clear error naming the argument."""

import pytest
import torch

import flowkern

# items "1 2" and "3" and "1 2 4"; termination token 0; trie tokens up to 4
TRIE = flowkern.Trie.build([[1, 2], [3], [1, 2, 4]], [1.0, 2.0, 3.0], eos_token_id=0)
TOKENS = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]])
LOGITS = torch.randn(2, 4, 6)


def call(**changes):
    arguments = dict(logits=LOGITS, trie=TRIE, rewards=None, tokens=TOKENS)
    arguments.update(changes)
    return flowkern.subtb_loss(arguments.pop("logits"), arguments.pop("trie"), arguments.pop("rewards"),
                               **arguments)


def with_logit(b, t, v, value):
    logits = LOGITS.clone()
    logits[b, t, v] = value
    return logits


CASES = {
    "logits not a tensor": (dict(logits=[[[0.0]]]), TypeError, r"logits must be a \(B, T, V\) tensor, got a list"),
    "logits not 3-d": (dict(logits=torch.zeros(2, 4)), ValueError,
                       r"logits must be a \(B, T, V\) tensor, got a torch.float32 tensor of shape \(2, 4\)"),
    "integer logits": (dict(logits=torch.zeros(2, 4, 6, dtype=torch.long)), TypeError,
                       "logits must be float16, bfloat16, float32 or float64, got torch.int64"),
    "tokens not a tensor": (dict(tokens=[[1, 2, 0, 0]]), TypeError, r"tokens must be a \(B, T\) tensor of token ids"),
    "float tokens": (dict(tokens=TOKENS.float()), TypeError, "tokens must be an integer tensor, got torch.float32"),
    "B mismatch": (dict(tokens=TOKENS[:1]), ValueError,
                   r"tokens has shape \(1, 4\) but logits has shape \(2, 4, 6\): tokens must be \(B, T\) = \(2, 4\)"),
    "T mismatch": (dict(tokens=TOKENS[:, :3]), ValueError, r"tokens has shape \(2, 3\) but logits has shape"),
    "T too short": (dict(logits=LOGITS[:, :1], tokens=TOKENS[:, :1]), ValueError,
                    "T = 1 positions is too short: the shortest item in the trie takes 2"),
    "token id >= V": (dict(tokens=torch.tensor([[1, 9, 0, 0], [3, 0, 0, 0]])), ValueError,
                      r"tokens\[0, 1\] = 9 is not a token id of logits with V = 6 columns"),
    "negative token id": (dict(tokens=torch.tensor([[1, 2, 0, 0], [-100, 0, 0, 0]])), ValueError,
                          r"tokens\[1, 0\] = -100 is not a token id of logits with V = 6 columns"),
    "no termination token": (dict(logits=LOGITS[:, :3], tokens=torch.tensor([[1, 2, 0], [1, 2, 4]])), ValueError,
                             r"tokens\[1\] has no termination token \(eos_token_id = 0\) in its T = 3 positions: "
                             r"every trajectory must end with it"),
    "leaves the trie": (dict(tokens=torch.tensor([[1, 3, 0, 0], [3, 0, 0, 0]])), ValueError,
                        r"tokens\[0, 1\] = 3 leaves the trie: it is not a child of the state reached by "
                        r"tokens\[0, :1\] \(on_invalid='ignore' drops such trajectories\)"),
    "terminates a prefix that is no item": (dict(tokens=torch.tensor([[1, 0, 0, 0], [3, 0, 0, 0]])), ValueError,
                                            r"tokens\[0, 1\] = 0 leaves the trie"),
    "trie not a Trie": (dict(trie={1: {}}), TypeError, "trie must be a flowkern.Trie, got dict"),
    "trie on another device": (dict(trie=TRIE.to("meta")), ValueError,
                               r"trie is on meta but logits are on cpu: move it with trie.to\(logits.device\)"),
    "tokens on another device": (dict(tokens=TOKENS.to("meta")), ValueError, "tokens is on meta but logits are on cpu"),
    "vocabulary smaller than the trie": (dict(logits=LOGITS[..., :4]), ValueError,
                                         "logits have V = 4 columns but the trie holds token id 4"),
    "lam = 0": (dict(lam=0.0), ValueError, "lam must be a finite number > 0, got 0.0"),
    "lam < 0": (dict(lam=-0.5), ValueError, "lam must be a finite number > 0, got -0.5"),
    "lam nan": (dict(lam=float("nan")), ValueError, "lam must be a finite number > 0, got nan"),
    "lam inf": (dict(lam=float("inf")), ValueError, "lam must be a finite number > 0, got inf"),
    "lam not a number": (dict(lam="1"), ValueError, "lam must be a finite number > 0, got '1'"),
    "pref_weight nan": (dict(pref_weight=float("nan")), ValueError, "pref_weight must be a finite number, got nan"),
    "unknown normalize": (dict(normalize="vocab"), ValueError, "normalize must be one of 'trie', 'full'; got 'vocab'"),
    "unknown form": (dict(form="tb"), ValueError, "form must be one of 'process', 'flower'; got 'tb'"),
    "unknown pref_mode": (dict(pref_mode="mul"), ValueError, "pref_mode must be one of 'div', 'add'; got 'mul'"),
    "unknown reduction": (dict(reduction="max"), ValueError, "reduction must be one of 'mean', 'sum', 'none'"),
    "unknown on_invalid": (dict(on_invalid="skip"), ValueError, "on_invalid must be one of 'error', 'ignore'"),
    "unknown backend": (dict(backend="cuda"), ValueError, "backend must be one of 'auto', 'torch', 'triton'; got 'cuda'"),
    "inplace_grad not a bool": (dict(inplace_grad=1), TypeError, "inplace_grad must be a bool, got a int"),
    "flower form with the trie policy": (dict(form="flower", normalize="trie"), ValueError,
                                         "form='flower' needs normalize='full'"),
    "preference of 0": (dict(rewards=torch.tensor([1.0, 0.0])), ValueError,
                        r"rewards\[1\] = 0.0: preference scores must be finite and > 0"),
    "negative preference": (dict(rewards=torch.tensor([-2.0, 1.0])), ValueError,
                            r"rewards\[0\] = -2.0: preference scores must be finite and > 0"),
    "nan preference": (dict(rewards=torch.tensor([1.0, float("nan")])), ValueError, r"rewards\[1\] = nan"),
    "inf preference": (dict(rewards=torch.tensor([float("inf"), 1.0])), ValueError, r"rewards\[0\] = inf"),
    "preference matrix entry <= 0": (dict(rewards=torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 1.0]])), ValueError,
                                     r"rewards\[1, 1\] \(trajectory 1's item\) = -1.0: preference scores must be "
                                     r"finite and > 0"),
    "preference of the wrong shape": (dict(rewards=torch.ones(3)), ValueError,
                                      r"rewards must have shape \(B,\) = \(2,\) or \(B, num_items\) = \(2, 3\), "
                                      r"got \(3,\)"),
    "preference not a tensor": (dict(rewards=[1.0, 1.0]), TypeError,
                                "rewards must be None or a real tensor of preference scores, got a list"),
    "preference on another device": (dict(rewards=torch.ones(2, device="meta")), ValueError,
                                     "rewards are on meta but logits are on cpu"),
    "nan logit where the loss reads": (dict(logits=with_logit(0, 1, 2, float("nan"))), ValueError,
                                       r"logits\[0, 1\] give log-probabilities \[nan\] \(token 2\): the logits "
                                       r"hold NaN/inf there"),
    "zero probability for the taken token": (dict(logits=with_logit(1, 0, 3, -float("inf"))), ValueError,
                                             r"logits\[1, 0\] give log-probabilities \[-inf\] \(token 3\)"),
    "nan logit in the flower form": (dict(logits=with_logit(0, 0, 5, float("nan")), form="flower"), ValueError,
                                     r"logits\[0, 0\] give log-probabilities \[nan, nan\] \(token 1\)"),
}


@pytest.mark.parametrize("changes, error, message", CASES.values(), ids=CASES.keys())
def test_subtb_loss_rejects(changes, error, message):
    with pytest.raises(error, match=message):
        call(**changes)


OVERFLOW_LOGITS = torch.randn(2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
OVERFLOW_CASES = {  # the products each argument enters overflow the compute dtype
    "lam: pair weights past float64": (dict(lam=1e308), r"lam = 1e\+308 is too large for T = 4 positions: the pair "
                                       r"weights Σ λ\^\(n−m−1\) reach e\^2127.6 and overflow torch.float64"),
    "lam: pair weights past float32": (dict(lam=1e13, logits=OVERFLOW_LOGITS.float()),
                                       r"lam = 10000000000000.0 is too large for T = 4 positions: .* overflow torch.float32"),
    "lam: the loss": (dict(lam=1e307, logits=OVERFLOW_LOGITS[:, :2] * 10, tokens=torch.tensor([[3, 0], [3, 0]])),
                      r"the loss of trajectory 1 overflows torch.float64: lam = 1e\+307 is too large \(its pair "
                      r"weights sum to 1e\+307\)"),
    "a preference that divides to past float32": (
        dict(logits=OVERFLOW_LOGITS.float(), rewards=torch.tensor([1.0, 1e-300], dtype=torch.float64)),
        r"rewards\[1\] = 1e-300 is too small: the process log-rewards log r_t / p overflow torch.float32"),
    "a preference whose loss overflows float64": (
        dict(rewards=torch.tensor([1e-300, 1.0], dtype=torch.float64)),
        r"the loss of trajectory 0 overflows torch.float64: its process log-rewards reach 1.39e\+300, from "
        r"rewards\[0\] too small for pref_mode='div'"),
    "pref_weight past float64": (dict(pref_mode="add", pref_weight=1e308, rewards=torch.tensor([2.0, 3.0])),
                                 r"the loss of trajectory 0 overflows torch.float64: its process log-rewards reach "
                                 r"6.93e\+307, from pref_weight = 1e\+308 too large"),
    "pref_weight past float32": (dict(logits=OVERFLOW_LOGITS.float(), pref_mode="add", pref_weight=1e308,
                                      rewards=torch.tensor([2.0, 3.0])),
                                 r"pref_weight = 1e\+308 is too large: pref_weight·log p with rewards\[0\] = 2.0 "
                                 r"overflows torch.float32"),
    "float64 logits of 1e300": (dict(logits=OVERFLOW_LOGITS * 1e300),
                                r"the loss of trajectory 0 overflows torch.float64: logits\[0, :\] give "
                                r"log-probabilities down to -.*e\+300: logits must be smaller in magnitude"),
    "float64 logits of 1e300, Flower form": (dict(logits=OVERFLOW_LOGITS * 1e300, form="flower"),
                                             r"the loss of trajectory 0 overflows torch.float64: logits\[0, :\]"),
    "float32 logits of 1e30": (dict(logits=OVERFLOW_LOGITS.float() * 1e30),
                               r"the loss of trajectory 0 overflows torch.float32: logits\[0, :\]"),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("changes, message", OVERFLOW_CASES.values(), ids=OVERFLOW_CASES.keys())
def test_subtb_loss_names_what_overflows_on_both_backends(changes, message, backend):
    with pytest.raises(ValueError, match=message):
        call(**dict(dict(logits=OVERFLOW_LOGITS, backend=backend), **changes))


def test_sums_just_inside_the_compute_dtype_stay_finite():
    """The bounds above are where overflow starts, not guesses: just inside them the loss and
    its gradient are finite on both backends."""
    for backend in ("torch", "triton"):
        for changes in (dict(lam=1e12), dict(lam=1e5, logits=OVERFLOW_LOGITS.float()),
                        dict(rewards=torch.tensor([1e-150, 1.0], dtype=torch.float64)),
                        dict(logits=OVERFLOW_LOGITS * 1e150)):
            logits = changes.pop("logits", OVERFLOW_LOGITS).clone().requires_grad_()
            loss = call(logits=logits, backend=backend, **changes)
            loss.backward()
            assert torch.isfinite(loss) and bool(torch.isfinite(logits.grad).all()), (backend, changes)


def test_the_rejected_cases_pass_once_mended():
    """The unchanged arguments are valid, so each case above fails for its own reason."""
    assert torch.isfinite(call())
    assert torch.isfinite(call(rewards=torch.tensor([1.0, 2.0]), form="flower"))


PIECE = torch.zeros(2, 4)
LENGTHS = torch.tensor([2, 3])

MODIFIED_CASES = {
    "log_pf not a tensor": (dict(log_pf=[0.0]), ValueError, r"log_pf must be a floating-point \(B, T\) tensor, got a list"),
    "log_pterm 1-d": (dict(log_pterm=torch.zeros(4)), ValueError, r"log_pterm must be a floating-point \(B, T\) tensor"),
    "log_r of another shape": (dict(log_r=torch.zeros(2, 5)), ValueError,
                               r"log_r has shape \(2, 5\) on cpu but log_pf has \(2, 4\) on cpu: they must match"),
    "integer log_r": (dict(log_r=torch.zeros(2, 4, dtype=torch.long)), ValueError, "log_r must be a floating-point"),
    "float lengths": (dict(lengths=torch.tensor([2.0, 3.0])), ValueError, r"lengths must be a \(2,\) integer tensor"),
    "lengths of another shape": (dict(lengths=torch.tensor([2])), ValueError, r"lengths must be a \(2,\) integer"),
    "length past T": (dict(lengths=torch.tensor([2, 4])), ValueError, r"lengths must lie in \[0, T - 1\] = \[0, 3\]"),
    "negative length": (dict(lengths=torch.tensor([-1, 3])), ValueError, r"lengths must lie in \[0, T - 1\]"),
    "nan where the loss reads": (dict(log_r=torch.tensor([[0.0, float("nan"), 0.0, 0.0], [0.0] * 4])), ValueError,
                                 "log_r holds NaN or inf at a state the loss uses"),
    "lam = 0": (dict(lam=0), ValueError, "lam must be a finite number > 0, got 0"),
    "lam past float32": (dict(lam=1e20), ValueError, r"lam = 1e\+20 is too large for T = 4 positions"),
    "pieces whose loss overflows": (dict(log_pf=torch.tensor([[0.0, 3e19, 0.0, 0.0], [0.0] * 4])), ValueError,
                                    r"the loss of row 0 overflows torch.float32: log_pf, log_pterm and log_r reach "
                                    r"3e\+19 in magnitude there"),
    "unknown reduction": (dict(reduction="avg"), ValueError, "reduction must be one of 'mean', 'sum', 'none'"),
}


@pytest.mark.parametrize("changes, error, message", MODIFIED_CASES.values(), ids=MODIFIED_CASES.keys())
def test_modified_subtb_loss_rejects(changes, error, message):
    arguments = dict(log_pf=PIECE, log_pterm=PIECE, log_r=PIECE, lengths=LENGTHS, lam=1.0, reduction="mean")
    arguments.update(changes)
    with pytest.raises(error, match=message):
        flowkern.modified_subtb_loss(**arguments)


def test_modified_subtb_loss_reads_nothing_past_lengths():
    piece = torch.tensor([[0.0, 1.0, 2.0, float("nan")], [0.0, 1.0, 2.0, 3.0]])
    assert torch.isfinite(flowkern.modified_subtb_loss(piece, piece, piece, LENGTHS))


@pytest.mark.parametrize("changes, error, message", [
    (dict(normalize="vocab"), ValueError, "normalize must be one of 'trie', 'full'; got 'vocab'"),
    (dict(tokens=torch.tensor([[1, 3, 0, 0], [3, 0, 0, 0]])), ValueError, r"tokens\[0, 1\] = 3 leaves the trie"),
    (dict(logits=LOGITS[..., :4]), ValueError, "logits have V = 4 columns but the trie holds token id 4"),
    (dict(logits=torch.tensor([[[0.0, -3e38, 3e38, 0, 0, 0]] * 4] * 2), normalize="full"), ValueError,
     r"logits\[0, 0\] give log-probabilities \[-inf\] \(token 1\)"),
    (dict(logits=torch.tensor([[[0.0, 3e38, 2e38, 0, 0, 0]] * 4] * 2), normalize="full"), ValueError,
     r"logits\[0, :\] give log-probabilities whose sum overflows torch.float32"),
])
def test_sequence_log_probs_rejects(changes, error, message):
    arguments = dict(logits=LOGITS, tokens=TOKENS)
    arguments.update(changes)
    with pytest.raises(error, match=message):
        flowkern.sequence_log_probs(arguments.pop("logits"), TRIE, **arguments)
