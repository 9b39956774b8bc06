"""A small DDPG actor-critic for one-dimensional actions in [0, 1], written with torch.

``DDPGAgent`` holds an actor ``mu(s) -> [0, 1]`` (sigmoid output), a critic ``Q(s, a)``, their target
copies (soft-updated with rate ``tau``), a replay buffer of transitions and the episode rewards seen.
Rewards arrive once per episode (the score of the episode's plan); every step of an episode gets a
transition whose reward is 0 except on the last step, which gets the episode's reward, normalised
when sampled by its rank among all episode rewards so far (``rank_normalise``: the learning rates need
no retuning between a score in [0, 1] and one in the thousands, and a few disastrous episodes do not
flatten the differences between good ones). The critic regresses
``r + gamma * Q'(s', mu'(s'))`` (``gamma = 1``: the episode's reward is all that counts); the actor
ascends ``Q(s, mu(s))``. Exploration is a truncated normal around ``mu(s)`` on [0, 1] whose width the
caller sets per episode.

Every random number comes from the numpy ``rng`` the agent is built with (network initialisation
included, drawn under a forked torch RNG), and torch runs on one thread inside the agent, so a seed
gives the same agent on any machine configuration.

>>> import numpy as np
>>> agent = DDPGAgent(state_dim=3, rng=np.random.default_rng(0), hidden=16)
>>> a = agent.act(np.zeros(3, dtype=np.float32), noise=0.2)
>>> 0.0 <= a <= 1.0
True
>>> for _ in range(40):   # reward 1 for actions near 0.8, learnt from replay
...     s = np.zeros(3, dtype=np.float32)
...     a = agent.act(s, noise=0.5)
...     agent.remember([(s, a)], reward=1.0 - abs(a - 0.8))
>>> agent.update(200) > 0
True
>>> abs(agent.act(np.zeros(3, dtype=np.float32), noise=0.0) - 0.8) < 0.25
True
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import numpy as np
import torch
from scipy.stats import truncnorm
from torch import nn

__all__ = ["DDPGAgent", "ReplayBuffer", "rank_normalise"]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread for the block: small networks run fastest so, and float sums agree everywhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mlp(inputs: int, hidden: int, out: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                               nn.Linear(hidden, 1)]
    return nn.Sequential(*layers, *([out] if out is not None else []))


def rank_normalise(rewards: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Each reward's place among the episode rewards ``seen`` so far, in [-1/2, 1/2]: the share it
    beats (ties count half) minus one half. Invariant to any increasing transform of the score, so a
    few disastrous episodes (heavy tails) do not squash the differences between good ones.

    >>> rank_normalise(np.array([1.0, 5.0, -100.0]), np.array([-100.0, 1.0, 2.0, 5.0])).tolist()
    [-0.125, 0.375, -0.375]
    """
    seen = np.sort(seen)
    below = np.searchsorted(seen, rewards, side="left")
    upto = np.searchsorted(seen, rewards, side="right")
    return ((below + upto) / 2.0) / len(seen) - 0.5


class ReplayBuffer:
    """Transitions ``(state, action, reward, next_state, done)`` in a ring of ``capacity``; the action is
    the one taken (after the environment clamped it), the reward raw (normalised when sampled)."""

    def __init__(self, state_dim: int, capacity: int = 20_000) -> None:
        self.capacity, self.size, self._next = capacity, 0, 0
        self.state = np.zeros((capacity, state_dim), dtype=np.float32)
        self.next_state = np.zeros((capacity, state_dim), dtype=np.float32)
        self.action = np.zeros(capacity, dtype=np.float32)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.done = np.zeros(capacity, dtype=np.float32)

    def add(self, state: np.ndarray, action: float, reward: float, next_state: np.ndarray, done: bool) -> None:
        i = self._next
        self.state[i], self.action[i], self.reward[i] = state, action, reward
        self.next_state[i], self.done[i] = next_state, float(done)
        self._next = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        idx = rng.integers(self.size, size=n)
        return self.state[idx], self.action[idx], self.reward[idx], self.next_state[idx], self.done[idx]


class DDPGAgent:
    """Actor-critic with target networks, replay and reward normalisation (module docstring).

    ``hidden``: width of the two hidden layers of actor and critic; ``lr_actor`` / ``lr_critic``:
    Adam learning rates; ``tau``: soft target update rate; ``batch_size``: transitions per update."""

    def __init__(self, state_dim: int, rng: np.random.Generator, *, hidden: int = 64, lr_actor: float = 1e-3,
                 lr_critic: float = 2e-3, tau: float = 0.01, batch_size: int = 64, gamma: float = 1.0) -> None:
        self.rng, self.tau, self.batch_size, self.gamma = rng, tau, batch_size, gamma
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**31)))
            self.actor = _mlp(state_dim, hidden, nn.Sigmoid())
            self.critic = _mlp(state_dim + 1, hidden)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr_actor, foreach=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr_critic, foreach=True)
        self._pairs = ([*self.actor_target.parameters(), *self.critic_target.parameters()],
                       [*self.actor.parameters(), *self.critic.parameters()])
        self.buffer = ReplayBuffer(state_dim)
        self.rewards: list[float] = []  # every episode's reward, for the normalisation

    def act(self, state: np.ndarray, noise: float) -> float:
        """``mu(state)`` plus truncated-normal noise of width ``noise``, within [0, 1]."""
        with _one_thread(), torch.no_grad():
            mu = float(self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0, 0])
        if noise <= 0:
            return mu
        lo, hi = (0.0 - mu) / noise, (1.0 - mu) / noise
        return float(np.clip(truncnorm.rvs(lo, hi, loc=mu, scale=noise, random_state=self.rng), 0.0, 1.0))

    def remember(self, steps: Sequence[tuple[np.ndarray, float]], reward: float) -> None:
        """Store one episode: its ``(state, action taken)`` pairs in order and its reward."""
        self.rewards.append(float(reward))
        for t, (state, action) in enumerate(steps):
            last = t == len(steps) - 1
            nxt = state if last else steps[t + 1][0]
            self.buffer.add(state, action, reward if last else 0.0, nxt, last)

    def update(self, n: int) -> int:
        """``n`` gradient steps of critic and actor on replayed batches; returns the steps taken
        (none until the buffer holds a batch)."""
        if self.buffer.size < min(self.batch_size, 8) or n <= 0:
            return 0
        seen = np.asarray(self.rewards)
        with _one_thread():
            for _ in range(n):
                batch = list(self.buffer.sample(self.batch_size, self.rng))
                batch[2] = np.where(batch[4] > 0, rank_normalise(batch[2], seen), 0.0).astype(np.float32)
                s, a, r, s2, done = (torch.as_tensor(x) for x in batch)
                with torch.no_grad():
                    q_next = self.critic_target(torch.cat([s2, self.actor_target(s2)], 1))[:, 0]
                    target = r + self.gamma * (1.0 - done) * q_next
                q = self.critic(torch.cat([s, a[:, None]], 1))[:, 0]
                critic_loss = nn.functional.mse_loss(q, target)
                self.critic_opt.zero_grad()
                critic_loss.backward()
                self.critic_opt.step()
                actor_loss = -self.critic(torch.cat([s, self.actor(s)], 1)).mean()
                self.actor_opt.zero_grad()
                actor_loss.backward(inputs=list(self.actor.parameters()))
                self.actor_opt.step()
                with torch.no_grad():  # soft target update: target += tau * (online - target)
                    torch._foreach_lerp_(*self._pairs, self.tau)
        return n
