"""Train early-exit adapters on text the model generates itself (no data set downloads).

Data: greedy and sampled continuations of varied chat prompts (``chat_prompts``; random token prompts for
tiny random models), generated a batch of sequences at a time. At every decoding position we record the hidden
state after each exit layer and the full model's greedy next token (for a sampled continuation the greedy
token, not the sampled one, is the target). Prompts are split into train and held-out sets before
generation, so no held-out context is seen in training. Training is cross-entropy of the adapted exit's
logits against the greedy tokens (AdamW, warm-up + cosine schedule); agreement is top-1 exit == greedy token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipesim.models.early_exit import (
    RMS_EPS,
    ExitAdapter,
    early_exit_logits,
    exit_agreement,
    exit_predictions,
    forward_with_exits,
    output_head_weight,
)
from pipesim.models.kv_cache import token_seq_mask
from pipesim.models.llama import LlamaStage

__all__ = [
    "ExitData",
    "ExitTrainingConfig",
    "ExitTrainingResult",
    "chat_prompts",
    "eval_prompts",
    "collect_exit_data",
    "random_prompts",
    "train_adapter",
    "train_exit_adapters",
]

# ----------------------------------------------------------------- prompts

_TOPICS = (
    "photosynthesis", "black holes", "the French Revolution", "compound interest", "the immune system",
    "volcanoes", "machine learning", "the Roman Empire", "climate change", "DNA replication",
    "the stock market", "jazz music", "plate tectonics", "vaccines", "the internet", "electric cars",
    "coral reefs", "the printing press", "inflation", "quantum computing", "honey bees", "the water cycle",
    "ancient Egypt", "solar panels", "sleep", "chess", "the Moon landing", "antibiotics", "recycling",
    "the human heart", "earthquakes", "Shakespeare", "cryptocurrency", "the Renaissance", "rainforests",
    "nuclear energy", "the Olympic Games", "gravity", "coffee", "the Great Wall of China", "meditation",
    "supply and demand", "dinosaurs", "the Silk Road", "bread baking", "tides", "vitamins",
    "the periodic table", "democracy", "glaciers", "wind turbines", "origami", "the Industrial Revolution",
    "octopuses", "public libraries", "marathon training", "the speed of light", "bicycles", "tea ceremonies",
    "password security", "the Amazon river", "social media", "fermentation", "the violin", "comets",
    "urban gardening", "the Cold War", "probability", "hurricanes", "the Mona Lisa", "remote work",
    "3D printing", "the Byzantine Empire", "migrating birds", "composting", "video games", "the Sahara desert",
    "blood types", "the metric system", "sourdough starters", "lightning", "the Beatles", "mushrooms",
    "the Mars rovers", "time zones", "minimalism", "penguins", "the Eiffel Tower", "noise pollution",
    "sign language", "the Fibonacci sequence", "elephants", "the first computers", "budget travel",
    "volunteering", "the Aztecs", "fast fashion", "caffeine", "the northern lights", "typography",
)
_TASKS = (
    "Explain {t} in simple terms.",
    "What are three interesting facts about {t}?",
    "Write a short poem about {t}.",
    "What are the pros and cons of {t}?",
    "How would you explain {t} to a ten-year-old?",
    "Give me a brief history of {t}.",
    "Why does {t} matter today?",
    "Write a short story that involves {t}.",
    "What are common misconceptions about {t}?",
    "Summarize the key ideas behind {t} in a few sentences.",
    "Write a quiz with three questions about {t}, and give the answers.",
    "I have to give a two-minute talk on {t}. Can you draft it?",
    "What would the world look like without {t}?",
    "Describe {t} as if you were a tour guide.",
    "List five words that come to mind with {t}, and say why.",
    "Write a tweet that makes people curious about {t}.",
    "How is {t} connected to everyday life?",
    "Write a dialogue between a teacher and a student about {t}.",
    "What questions do scientists or historians still ask about {t}?",
    "Give me a step-by-step beginner's guide to {t}.",
    "Compare {t} with something similar and explain the difference.",
    "Write a limerick about {t}.",
    "What is one surprising thing most people don't know about {t}?",
    "Explain {t} using an analogy with cooking.",
    "Write a product description for an imaginary book about {t}.",
)
_QUESTIONS = (
    "What is the capital of Australia, and why was it chosen?",
    "Write a Python function that checks whether a string is a palindrome.",
    "How do I make a simple tomato sauce?",
    "Translate 'Good morning, how are you?' into Spanish and French.",
    "What is 17 multiplied by 23? Show your steps.",
    "Give me tips for a job interview.",
    "Write a haiku about autumn leaves.",
    "What is the difference between weather and climate?",
    "How can I improve my sleep schedule?",
    "Explain recursion with an example in JavaScript.",
    "What should I pack for a weekend camping trip?",
    "Write a polite email asking my manager for a day off.",
    "Why is the sky blue?",
    "List five healthy breakfast ideas.",
    "How does a bill become a law in the United States?",
    "What is the Pythagorean theorem? Give an example.",
    "Suggest a name for a bakery and explain the choice.",
    "How do airplanes stay in the air?",
    "Write a SQL query that finds the ten most recent orders.",
    "What are the main causes of World War I?",
    "How do I start learning to play the guitar?",
    "Describe a sunset over the ocean.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a workout plan for beginners.",
    "Write a limerick about a cat who loves pizza.",
    "Explain the rules of soccer briefly.",
    "What are prime numbers? List the first ten.",
    "How do I change a flat tire?",
    "Write a short dialogue between a robot and a child.",
    "My friend is sad after failing an exam. What could I say to cheer them up?",
    "Sort these numbers from smallest to largest: 42, 7, 19, 3, 88, 56.",
    "Rewrite this sentence to sound more formal: 'hey, can u send me the file asap?'",
    "Is a tomato a fruit or a vegetable?",
    "Write a function in C that returns the maximum of an array of integers.",
    "What is the boiling point of water at the top of Mount Everest, roughly, and why?",
    "Give me three ideas for a child's birthday party at home.",
    "How many minutes are there in a week? Explain the calculation.",
    "Write a thank-you card for a teacher who is retiring.",
    "What is the plot of Romeo and Juliet in five sentences?",
    "How do I politely decline an invitation to a wedding?",
    "Classify these animals as mammals, birds or reptiles: eagle, lizard, whale, sparrow, snake.",
    "Explain what an API is to someone who doesn't code.",
    "What are some good habits for keeping a clean kitchen?",
    "Write a short horror story in exactly four sentences.",
    "If a train travels 300 km in 2.5 hours, what is its average speed?",
    "What is the difference between 'affect' and 'effect'?",
    "Give me a grocery list for a week of vegetarian dinners.",
    "Pretend you are a pirate and describe your ship.",
    "How does a credit score work?",
    "Write a regular expression that matches an email address, and explain it.",
    "What are the stages of grief?",
    "Explain the difference between RAM and storage in a computer.",
    "Write a cover letter opening paragraph for a junior graphic designer.",
    "What makes a good password?",
    "Summarize the water cycle in one paragraph for a school report.",
    "How can I reduce my household's energy use in winter?",
    "Write a bedtime story about a dragon who is afraid of the dark.",
    "What is the derivative of x squared plus three x?",
    "How should I prepare for a long-haul flight?",
    "Describe the taste of a lemon to someone who has never had one.",
    "What is the difference between a simile and a metaphor? Give examples.",
    "Write a shell command that counts the lines in all .txt files in a folder.",
    "What are the benefits of learning to cook at home?",
    "Give me a packing checklist for moving to a new apartment.",
    "Why do cats purr?",
    "Explain how to make a paper airplane that flies far.",
    "Write an apology message to a customer whose order arrived late.",
    "What is the tallest mountain in Africa, and how high is it?",
    "How do noise-cancelling headphones work?",
    "Suggest five board games for a family evening and say who each suits.",
    "What is a haiku? Write one about the sea.",
    "Convert 5 miles to kilometres and show the working.",
    "Explain the rules of tic-tac-toe and a simple strategy to never lose.",
    "Write a motivational quote about persistence and explain it.",
    "What are the main differences between Python and Java?",
    "How do I keep houseplants alive while I am on holiday?",
    "Write a short news report about a cat rescued from a tree.",
    "What causes the seasons on Earth?",
    "Give me a simple budget plan for a student living on 800 dollars a month.",
    "How do you say thank you in five different languages?",
    "Write a JavaScript snippet that reverses a string.",
    "What happens in the body when we exercise?",
    "Describe your ideal weekend in a few sentences.",
    "Explain what a black hole's event horizon is.",
    "Write a riddle and give its answer.",
    "What are the three branches of government in many democracies?",
    "How can I become a better listener?",
    "Write instructions for brewing a good cup of tea.",
    "What is machine translation and how does it work in simple terms?",
    "Explain why the Titanic sank.",
)
# Requests written apart from the training pool (no shared template or topic): agreement on their greedy
# continuations is the acceptance rate reported for the shipped adapters (exit_training.eval_prompts).
_EVAL_PROMPTS = (
    "Plan a three-day trip to Rome for a family with two kids.",
    "What is the difference between a virus and a bacterium?",
    "Write a Python class that represents a bank account with deposit and withdraw methods.",
    "Why do leaves change colour in the autumn?",
    "Give me a recipe for pancakes without eggs.",
    "Explain what a mortgage is and how interest on it works.",
    "Write a motivational message for a student before an exam.",
    "How does GPS determine your location?",
    "Tell me a fable about a fox and a crow, with a moral.",
    "What should I consider when buying a used car?",
    "Write a short speech for my sister's graduation party.",
    "How are new medicines tested before they reach pharmacies?",
    "Explain the offside rule in football with an example.",
    "Write a poem about a rainy Monday morning in the city.",
    "What are the health benefits and risks of intermittent fasting?",
    "Describe how a bill of exchange worked in medieval trade.",
    "How can a small business get its first hundred customers?",
    "Write a function in Go that computes the factorial of a number.",
    "What would happen if the Moon disappeared?",
    "Give me advice for my first week at a new job.",
    "Explain how a search engine ranks web pages.",
    "Write a letter to my future self, ten years from now.",
    "Why are some people left-handed?",
    "Describe the life cycle of a butterfly.",
)


def chat_prompts() -> list[str]:
    """Varied user requests for training data (topics x tasks, plus standalone questions), in a fixed order."""
    return [task.format(t=topic) for topic in _TOPICS for task in _TASKS] + list(_QUESTIONS)


def eval_prompts() -> list[str]:
    """Requests written apart from ``chat_prompts`` (no shared template or topic), for measuring agreement."""
    return list(_EVAL_PROMPTS)


def random_prompts(n: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` random token ids (for tiny random-weight models, which have no tokenizer)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, length), generator=gen).tolist()


# ----------------------------------------------------------------- data


@dataclass
class ExitData:
    """Recorded decoding positions: hidden states per exit layer, greedy targets and where each came from."""

    hidden: dict[int, torch.Tensor]  # exit layer -> [n, d_model] float32
    targets: torch.Tensor  # [n] the full model's greedy next token
    prompt_index: torch.Tensor  # [n] which prompt the position's continuation belongs to
    greedy: torch.Tensor  # [n] bool: position of a greedy (not sampled) continuation

    def __len__(self) -> int:
        return int(self.targets.numel())

    def select(self, mask: torch.Tensor) -> ExitData:
        return ExitData(
            {k: v[mask] for k, v in self.hidden.items()}, self.targets[mask], self.prompt_index[mask], self.greedy[mask]
        )


@dataclass
class _Job:
    prompt_index: int
    sampled: bool
    seed: int


def _evenly(i: int, fraction: float) -> bool:
    """True for about ``fraction`` of indices i = 0, 1, 2, ..., spread evenly."""
    return math.floor((i + 1) * fraction) > math.floor(i * fraction)


@torch.inference_mode()
def _generate_batch(
    model: LlamaStage,
    prompts: Sequence[Sequence[int]],
    jobs: Sequence[_Job],
    layers: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    eos_id: int | None,
    on_tokens: Callable[[int], None],
) -> list[tuple[_Job, dict[int, torch.Tensor], torch.Tensor]]:
    """Decode one continuation per job, all in one KV cache (one sequence id each); record every position."""
    batch = len(jobs)
    ids = [list(prompts[job.prompt_index]) for job in jobs]
    kv = model.make_kv_cache(sum(len(p) for p in ids) + batch * max_new_tokens, max_seqs=batch)
    gens = [torch.Generator().manual_seed(job.seed) for job in jobs]
    hidden: list[dict[int, list[torch.Tensor]]] = [{k: [] for k in layers} for _ in jobs]
    targets: list[list[int]] = [[] for _ in jobs]
    tokens = torch.tensor([t for p in ids for t in p], dtype=torch.int64)
    positions = torch.cat([torch.arange(len(p)) for p in ids])
    seqs = token_seq_mask([b for b, p in enumerate(ids) for _ in p], batch)
    rows = torch.tensor([len(p) for p in ids]).cumsum(0) - 1  # last prompt token of each sequence
    next_pos = torch.tensor([len(p) for p in ids])
    active = list(range(batch))
    for _ in range(max_new_tokens):
        logits, states = forward_with_exits(model, tokens, positions, seqs, kv, layers)
        logits = logits[rows]
        greedy = logits.argmax(dim=-1)
        still: list[int] = []
        fed: list[int] = []
        for j, b in enumerate(active):
            for k in layers:
                hidden[b][k].append(states[k][rows[j]])
            targets[b].append(int(greedy[j]))
            if jobs[b].sampled:
                top = torch.topk(logits[j] / temperature, min(top_k, logits.shape[-1]))
                pick = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=gens[b])
                token = int(top.indices[pick])
            else:
                token = int(greedy[j])
            if eos_id is not None and token == eos_id:
                continue
            still.append(b)
            fed.append(token)
        on_tokens(len(active))
        active = still
        if not active:
            break
        tokens = torch.tensor(fed, dtype=torch.int64)
        positions = next_pos[active].clone()
        next_pos[active] += 1
        seqs = token_seq_mask(active, batch)
        rows = torch.arange(len(active))
    return [
        (job, {k: torch.stack(hidden[b][k]) for k in layers}, torch.tensor(targets[b], dtype=torch.int64))
        for b, job in enumerate(jobs)
    ]


def collect_exit_data(
    model: LlamaStage,
    prompts: Sequence[Sequence[int]],
    layers: Sequence[int],
    n_tokens: int | None,
    *,
    max_new_tokens: int = 160,
    sampled_fraction: float = 0.25,
    temperature: float = 0.8,
    top_k: int = 50,
    eos_id: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> ExitData:
    """Generate continuations of ``prompts`` (cycling through them) until ``n_tokens`` positions are recorded
    (``None``: one continuation of each prompt).

    About ``sampled_fraction`` of continuations are sampled (temperature, top-k), the rest greedy; the order
    of prompts is shuffled with ``seed``; each sampled continuation has its own seeded generator.
    """
    if not model.is_full_model:
        raise ValueError("collect_exit_data needs a stage holding the whole model (embedding, all layers, head)")
    if not prompts:
        raise ValueError("collect_exit_data needs at least one prompt")
    for name, value in (("n_tokens", n_tokens), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"collect_exit_data {name} must be >= 1, got {value}")
    if not 0 <= sampled_fraction <= 1 or temperature <= 0:
        raise ValueError(
            f"collect_exit_data needs 0 <= sampled_fraction <= 1 and temperature > 0, got {sampled_fraction}, {temperature}"
        )
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    chunks: list[tuple[_Job, dict[int, torch.Tensor], torch.Tensor]] = []
    recorded = 0
    job_index = 0
    n_jobs = len(prompts) if n_tokens is None else None
    bar = tqdm(total=n_tokens, desc="generating", unit="tok", disable=not progress)

    def advance(k: int) -> None:  # the last batch records past n_tokens: the bar stops at its total
        bar.update(k if bar.total is None else max(0, min(k, bar.total - bar.n)))

    with bar:
        while (recorded < n_tokens) if n_tokens is not None else (job_index < len(prompts)):
            jobs = []
            for _ in range(batch_size if n_jobs is None else min(batch_size, n_jobs - job_index)):
                prompt = order[job_index % len(order)]
                jobs.append(_Job(prompt, _evenly(job_index, sampled_fraction), seed * 1_000_003 + job_index))
                job_index += 1
            for job, states, targets in _generate_batch(
                model, prompts, jobs, layers, max_new_tokens, temperature, top_k, eos_id, advance
            ):
                chunks.append((job, states, targets))
                recorded += len(targets)
    return ExitData(
        hidden={k: torch.cat([states[k] for _, states, _ in chunks]).clone() for k in layers},
        targets=torch.cat([targets for _, _, targets in chunks]).clone(),
        prompt_index=torch.cat([torch.full((len(t),), job.prompt_index) for job, _, t in chunks]),
        greedy=torch.cat([torch.full((len(t),), not job.sampled) for job, _, t in chunks]),
    )


def holdout_prompts(n_prompts: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """Bool [n_prompts]: the held-out prompts (about ``fraction`` of them, chosen with ``seed``)."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must lie in (0, 1), got {fraction}")
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + 1))
    held = torch.zeros(n_prompts, dtype=torch.bool)
    held[order[: max(1, round(fraction * n_prompts))]] = True
    return held


# ----------------------------------------------------------------- training

_TRAIN_SAMPLE = 4096  # training positions used to report training-set agreement


def _unit_rms(h: torch.Tensor) -> torch.Tensor:
    h = h.to(torch.float64)
    return h / torch.sqrt(h.pow(2).mean(dim=-1, keepdim=True) + RMS_EPS)


def fit_least_squares(
    model: LlamaStage,
    hidden: torch.Tensor,
    final_hidden: torch.Tensor,
    exit_layer: int,
    *,
    rank: int | None = 128,
    ridge: float = 1e-3,
    seed: int = 0,
) -> ExitAdapter:
    """Closed-form warm start: an adapter whose output approximates the final layer's state.

    Ridge regression of ``x_L - x_k`` on ``[x_k, 1]`` (``x`` = state at unit RMS; the final RMSNorm ignores
    scale); for a low rank, the fitted map is projected onto its top ``rank`` directions in the metric of
    the logits, ``M = diag(g) E^T E diag(g)`` (``g`` the final norm gain, ``E`` the head), which is
    reduced-rank regression minimising the logit error. ``ridge`` scales the mean diagonal of ``X^T X``.
    """
    if hidden.shape != final_hidden.shape or hidden.shape[0] == 0:
        raise ValueError(
            f"fit_least_squares needs hidden and final_hidden of one shape [n>0, d], got "
            f"{tuple(hidden.shape)} and {tuple(final_hidden.shape)}"
        )
    adapter = ExitAdapter.for_model(model, exit_layer, rank=rank, seed=seed)
    d = adapter.d_model
    x = _unit_rms(hidden)
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    gram = design.T @ design
    gram += ridge * gram.diagonal().mean() * torch.eye(d + 1, dtype=gram.dtype)
    solution = torch.linalg.solve(gram, design.T @ (_unit_rms(final_hidden) - x))  # [d+1, d]
    weight, bias = solution[:d].T, solution[d]
    with torch.no_grad():
        adapter.bias.copy_(bias)
        if rank is None:
            adapter.weight.copy_(weight)
            return adapter
        head = output_head_weight(model).detach().to(torch.float64)
        gain = model.output_norm.weight.detach().to(torch.float64)  # type: ignore[union-attr]
        metric = (head.T @ head) * gain[:, None] * gain[None, :] / head.shape[0]
        values, vectors = torch.linalg.eigh(metric)
        root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
        inv_root = (vectors * values.clamp_min(values.max() * 1e-12).rsqrt()) @ vectors.T
        fitted = x @ weight.T @ root  # the fitted changes, in logit metric
        _, basis = torch.linalg.eigh(fitted.T @ fitted)
        top = basis[:, -rank:]  # [d, rank], leading directions
        adapter.up.copy_(inv_root @ top)
        adapter.down.copy_(top.T @ root @ weight)
    return adapter


def train_adapter(
    model: LlamaStage,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    exit_layer: int,
    *,
    rank: int | None = 128,
    init: ExitAdapter | None = None,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    warmup: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> tuple[ExitAdapter, list[float]]:
    """Fit an adapter (cross-entropy against ``targets``) on hidden states after ``exit_layer``, starting
    from ``init`` (trained in place) or from the identity.

    Mini-batches walk seeded permutations of the data; the learning rate warms up linearly over
    ``warmup`` of the steps, then follows a cosine down to 10%. Returns the adapter and the loss per step.
    """
    if hidden.shape[0] != targets.shape[0] or hidden.shape[0] == 0:
        raise ValueError(f"train_adapter needs as many (>0) hidden states as targets, got {hidden.shape[0]}, {targets.shape[0]}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_adapter steps and batch_size must be >= 1, got {steps}, {batch_size}")
    torch.manual_seed(seed)
    adapter = ExitAdapter.for_model(model, exit_layer, rank=rank, seed=seed) if init is None else init
    adapter.train()
    matrices = [p for p in adapter.parameters() if p.dim() == 2]
    others = [p for p in adapter.parameters() if p.dim() != 2]  # bias and logit scale: no decay
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}], lr=lr
    )
    warm = max(1, round(warmup * steps))

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress_ = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    gen = torch.Generator().manual_seed(seed)
    n = hidden.shape[0]
    batch_size = min(batch_size, n)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    losses: list[float] = []
    bar = tqdm(range(steps), desc=f"training exit {exit_layer}", unit="step", disable=not progress)
    for _ in bar:
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        loss = F.cross_entropy(early_exit_logits(model, hidden[index], adapter), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
    adapter.eval()
    return adapter, losses


INITS = ("lsq", "identity")


@dataclass(frozen=True)
class ExitTrainingConfig:
    """What ``train_exit_adapters`` does (defaults suit SmolLM2-135M on 2 CPU cores)."""

    layers: tuple[int, ...]
    n_tokens: int = 60_000  # recorded positions (at least), train + held out
    steps: int = 1500  # cross-entropy steps after the warm start (0: warm start only)
    rank: int | None = None  # None: full-rank adapter (d_model^2 float16: 0.66 MB for SmolLM2)
    init: str = "lsq"  # "lsq": least-squares warm start (fit_least_squares); "identity": plain exit
    ridge: float = 1e-3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    holdout: float = 0.15  # fraction of prompts held out
    max_new_tokens: int = 160
    sampled_fraction: float = 0.25
    temperature: float = 0.8
    generate_batch: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("ExitTrainingConfig.layers must name at least one exit layer")
        for name in ("n_tokens", "batch_size", "max_new_tokens", "generate_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"ExitTrainingConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"ExitTrainingConfig.steps must be >= 0, got {self.steps}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"ExitTrainingConfig.rank must be >= 1 or None (full), got {self.rank}")
        if self.init not in INITS:
            raise ValueError(f"ExitTrainingConfig.init must be one of {INITS}, got {self.init!r}")
        if self.init == "identity" and self.steps == 0:
            raise ValueError("ExitTrainingConfig.steps=0 with init='identity' would train nothing")


@dataclass
class ExitTrainingResult:
    """One trained exit layer: held-out agreement before/after, sizes and times."""

    exit_layer: int
    adapter: ExitAdapter
    untrained: float  # held-out agreement, all held-out positions
    trained: float
    untrained_greedy: float  # held-out agreement on greedy continuations only (the α of greedy decoding)
    trained_greedy: float
    train_untrained: float  # agreement on the training positions (to see over-fitting)
    train_trained: float
    n_train: int
    n_holdout: int
    train_seconds: float
    final_loss: float
    fresh_untrained: float = float("nan")  # agreement on greedy continuations of separate eval prompts
    fresh_trained: float = float("nan")
    n_fresh: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def alpha(self) -> float:
        """Acceptance to expect under greedy decoding: agreement on the eval prompts when there are any,
        else on greedy continuations of the held-out prompts."""
        return self.fresh_trained if self.n_fresh else self.trained_greedy

    def summary(self) -> dict:
        return {
            "exit_layer": self.exit_layer,
            "rank": self.adapter.rank,
            "n_params": self.adapter.n_params(),
            "untrained": round(self.untrained, 4),
            "trained": round(self.trained, 4),
            "untrained_greedy": round(self.untrained_greedy, 4),
            "trained_greedy": round(self.trained_greedy, 4),
            "train_untrained": round(self.train_untrained, 4),
            "train_trained": round(self.train_trained, 4),
            "n_train": self.n_train,
            "n_holdout": self.n_holdout,
            "train_seconds": round(self.train_seconds, 1),
            "final_loss": round(self.final_loss, 4),
            "fresh_untrained": round(self.fresh_untrained, 4),
            "fresh_trained": round(self.fresh_trained, 4),
            "n_fresh": self.n_fresh,
            "alpha": round(self.alpha, 4),
            **self.extra,
        }


def split_data(data: ExitData, n_prompts: int, holdout: float, seed: int) -> tuple[ExitData, ExitData]:
    """(train, held-out) by prompt; raises when either side is empty."""
    held = holdout_prompts(n_prompts, holdout, seed)[data.prompt_index]
    train, test = data.select(~held), data.select(held)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(
            f"train/held-out split left {len(train)} train and {len(test)} held-out positions; "
            "raise n_tokens or change holdout"
        )
    return train, test


def train_exit_adapters(
    model: LlamaStage,
    prompts: Sequence[Sequence[int]],
    config: ExitTrainingConfig,
    *,
    eos_id: int | None = None,
    progress: bool = True,
    data: ExitData | None = None,
    eval_prompts: Sequence[Sequence[int]] | None = None,
    eval_data: ExitData | None = None,
) -> list[ExitTrainingResult]:
    """Generate data once (unless ``data`` is given), then train and evaluate one adapter per exit layer.

    Besides the held-out prompts of the pool, agreement is measured on one greedy continuation of each of
    ``eval_prompts`` (or on ``eval_data``), prompts written apart from the pool: the honest α for new text.
    """
    layers = sorted(set(config.layers) | ({model.config.n_layers} if config.init == "lsq" else set()))
    if eval_data is None and eval_prompts:
        eval_data = collect_exit_data(
            model,
            eval_prompts,
            config.layers,
            None,
            max_new_tokens=config.max_new_tokens,
            sampled_fraction=0.0,
            eos_id=eos_id,
            batch_size=config.generate_batch,
            seed=config.seed,
            progress=progress,
        )
    if data is None:
        data = collect_exit_data(
            model,
            prompts,
            layers,
            config.n_tokens,
            max_new_tokens=config.max_new_tokens,
            sampled_fraction=config.sampled_fraction,
            temperature=config.temperature,
            eos_id=eos_id,
            batch_size=config.generate_batch,
            seed=config.seed,
            progress=progress,
        )
    train, test = split_data(data, len(prompts), config.holdout, config.seed)
    sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))[:_TRAIN_SAMPLE]
    results = []
    for k in config.layers:
        start = time.perf_counter()
        init = None
        if config.init == "lsq":
            init = fit_least_squares(
                model,
                train.hidden[k],
                train.hidden[model.config.n_layers],
                k,
                rank=config.rank,
                ridge=config.ridge,
                seed=config.seed,
            )
        extra = {}
        if init is not None and config.steps:
            extra["warm_start"] = round(exit_agreement(model, test.hidden[k], test.targets, init), 4)
        losses: list[float] = []
        adapter = init
        if config.steps:
            adapter, losses = train_adapter(
                model,
                train.hidden[k],
                train.targets,
                k,
                rank=config.rank,
                init=init,
                steps=config.steps,
                batch_size=config.batch_size,
                lr=config.lr,
                weight_decay=config.weight_decay,
                seed=config.seed,
                progress=progress,
            )
        assert adapter is not None
        seconds = time.perf_counter() - start
        plain = exit_predictions(model, test.hidden[k]) == test.targets
        tuned = exit_predictions(model, test.hidden[k], adapter) == test.targets
        greedy = test.greedy

        def rate(hits: torch.Tensor) -> float:
            return float(hits.float().mean()) if hits.numel() else float("nan")

        results.append(
            ExitTrainingResult(
                exit_layer=k,
                adapter=adapter,
                untrained=rate(plain),
                trained=rate(tuned),
                untrained_greedy=rate(plain[greedy]),
                trained_greedy=rate(tuned[greedy]),
                train_untrained=exit_agreement(model, train.hidden[k][sample], train.targets[sample]),
                train_trained=exit_agreement(model, train.hidden[k][sample], train.targets[sample], adapter),
                n_train=len(train),
                n_holdout=len(test),
                train_seconds=seconds,
                final_loss=sum(losses[-20:]) / len(losses[-20:]) if losses else float("nan"),
                fresh_untrained=exit_agreement(model, eval_data.hidden[k], eval_data.targets)
                if eval_data is not None
                else float("nan"),
                fresh_trained=exit_agreement(model, eval_data.hidden[k], eval_data.targets, adapter)
                if eval_data is not None
                else float("nan"),
                n_fresh=0 if eval_data is None else len(eval_data),
                extra=extra,
            )
        )
    return results
