"""The app's Versions tab: every version on fixed measures, side-by-side answers, and a blind arena.

Mount it inside the app's Blocks (within ``gr.Tabs()`` if the app uses tabs)::

    with gr.Blocks() as demo:
        ...
        versions = build_versions_tab(ctx)   # ctx has .config, .store, .registry

The arena is blind: two versions answer the user's prompt, shown as "A" and "B" in random order;
only after the vote are the names revealed. Votes go to the store (``arena_votes``) and the
Bradley-Terry ratings (``loop.core.arena``) are shown; the gate can use them (``gate.use_arena``).

Blind means the side-by-side view cannot unmask it: side by side answers greedily (the same prompt
gives the same answer every time), so the arena *samples* its answers instead (the chat's
temperature and top-p, ``ARENA_TEMPERATURE`` when the chat is greedy, a fresh seed per answer),
and while an arena question is open, side by side refuses that same prompt.

Votes are limited: one vote per pair of versions per browser session (Gradio's session). A session
that has voted on every pair is told so instead of being asked again. The limit is kept in memory
(``MAX_TRACKED_SESSIONS`` sessions, oldest forgotten first); a restart resets it.

The measures plot (``metrics_figure``) and the table under it show every version, the base v1
included, on the same fixed measures: regression loss on the regression set, pass rate on the fixed
probe set, share of general answers right (cached in each ``version.json`` by ``python -m
loop.versions measure`` and the cycle: loop/version_measures.py), the canary's thumbs-down rate when
its canary was decided (``canary.jsonl``) and the arena rating when it has games. They are read,
never computed here: the plot loads no model. A missing value is a gap and is named, never a 0. A
cycle's held-out loss comes from that cycle's own held-out set, so it appears only in the table, as
its gate compared it: candidate against the version it replaced.

The canary plot (``canary_figure``) shows the live canary's thumbs-down rate beside the current
version's, cumulative since the canary started, each with its 95% credible interval (the numbers
``python -m loop.versions canary`` prints and the cycle decides on: ``loop.core.canary``); with no
canary running it shows the last one's outcome.

Models are loaded through ``app.probe_runner.LlamaCache`` (a few kept loaded, keyed by version id
and sha256; each a ``loop.core.gguf_model.GgufModel``, tokenised and decoded as the chat is) and every
generation holds its model's lock; the tab's generating events share the chat's queue
(``concurrency_id="generate"``), so the tab never runs two llama.cpp generations at once next to the chat.
"""

from __future__ import annotations

import collections
import random
import threading
from typing import Any

import gradio as gr

from app.errors import user_safe
from app.probe_runner import LlamaCache, ProbeAnswer
from loop.core import arena, canary, measures
from loop.core.registry import RegistryError, Version

ARENA_CHOICES = ["A is better", "B is better", "Tie"]
_WINNER = {"A is better": "a", "B is better": "b", "Tie": "tie"}
ARENA_TEMPERATURE = 0.7  # used when the chat itself is greedy: greedy arena answers are the side-by-side's
MAX_TRACKED_SESSIONS = 100_000


def _voter(request: Any) -> str:
    """The browser session a request comes from (Gradio's ``session_hash``)."""
    return str(getattr(request, "session_hash", None) or "anonymous")


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


# The fixed measures' cache in each version.json (``metrics["measures"]``, taken by ``python -m
# loop.versions measure`` and by the cycle after a promotion) is read by the core's rules
# (loop.core.measures): no model is loaded for the plot, and no conductor module is imported.
FIXED_MEASURES = (("regression_loss", "regression loss"), ("probe_pass_rate", "probe pass rate"),
                  ("general_right", "general answers right"))
MEASURE_COLUMNS = ["version", "regression loss", "probe pass rate", "general answers right",
                   "canary thumbs-down rate", "arena rating", "gate comparison on this cycle's held-out set"]


def plot_data(versions: list[Version], ratings: dict[str, dict[str, Any]] | None = None,
              canary_log: list[dict[str, Any]] | None = None, current: str | None = None,
              running_canary: str | None = None) -> dict[str, Any]:
    """Every version's fixed measures, canary and arena figures (None where missing, never 0), and its
    gate comparison; a measure from another set than the newest one's is ``stale`` (loop.core.measures)."""
    ids = [v.id for v in versions]
    fixed = measures.shown(versions)
    series: dict[str, list[float | None]] = {name: fixed[name]["values"] for name in measures.NAMES}
    canaries = measures.canary_outcomes(canary_log or [])
    series["canary_thumbs_down_rate"] = [canaries[i]["rate"] if i in canaries else None for i in ids]
    ratings = ratings or {}
    series["arena_rating"] = [ratings[i]["rating"] if ratings.get(i, {}).get("games") else None for i in ids]
    return {"ids": ids, "current": current, "canary": running_canary, "series": series,
            "stale": {name: fixed[name]["stale"] for name in measures.NAMES},
            "sets": {name: fixed[name]["set"] for name in measures.NAMES},
            "canary_rated": {i: canaries[i]["rated"] for i in canaries},
            "arena_games": {i: ratings[i]["games"] for i in ids if ratings.get(i, {}).get("games")},
            "gate": [measures.gate_comparison(v) for v in versions]}


def _panel(ax: Any, xs: list[int], ids: list[str], lines: list[tuple[str, list[float | None], str]],
           empty: str) -> None:
    """Each series over every version; a missing value is a gap in the line and named, never drawn as 0."""
    drawn = False
    notes = []
    for label, values, style in lines:
        ys = [float("nan") if v is None else v for v in values]
        if any(v is not None for v in values):
            ax.plot(xs, ys, style, label=label)
            drawn = True
        gaps = [i for i, v in zip(ids, values) if v is None]
        if gaps and len(gaps) < len(ids):
            notes.append(f"{label}: missing for {', '.join(gaps)}")
    if drawn:
        ax.legend(loc="best", fontsize=7)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, fontsize=8)
    if notes:
        ax.text(0.01, 0.02, "; ".join(notes), transform=ax.transAxes, fontsize=6, color="grey", va="bottom")


def metrics_figure(data: dict[str, Any]) -> Any:
    """Three panels over every version (v1 included): regression loss; probe pass rate, general answers
    right and canary thumbs-down rate; arena rating. From ``plot_data``: cached values only."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state in a server

    ids, series, current = data["ids"], data["series"], data.get("current")
    xs = list(range(len(ids)))
    fig = Figure(figsize=(7, 6.4), layout="constrained")
    axes = fig.subplots(3, 1)  # not sharex: each panel keeps its version labels
    hint = "not measured yet: python -m loop.versions measure --all"
    _panel(axes[0], xs, ids, [("regression loss", series["regression_loss"], "s-")], hint)
    axes[0].set_ylabel("nats/token\n(lower is better)", fontsize=8)
    _panel(axes[1], xs, ids, [("probe pass rate", series["probe_pass_rate"], "o-"),
                              ("general answers right", series["general_right"], "^-"),
                              ("canary thumbs-down rate (lower is better)", series["canary_thumbs_down_rate"], "v:")],
           hint)
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_ylabel("share", fontsize=8)
    _panel(axes[2], xs, ids, [("arena rating", series["arena_rating"], "d:")], "no arena games yet")
    axes[2].set_ylabel("Elo scale", fontsize=8)
    for ax in axes:
        ax.set_xticks(xs, [f"{i}*" if i == current else i for i in ids])
        ax.set_xlim(-0.5, max(len(ids) - 0.5, 0.5))
    axes[2].set_xlabel("version (* = current); every version on the same fixed sets")
    sets = [f"{s['set']} {str(s['hash'])[:8]}" for s in data.get("sets", {}).values() if s]
    if sets:
        axes[0].set_title("fixed sets: " + ", ".join(dict.fromkeys(sets)), fontsize=8)
    return fig


def measures_rows(data: dict[str, Any]) -> list[list[Any]]:
    """The table under the plot: one row per version, missing values named (never 0), and the cycle's
    held-out figures only as its gate compared them."""
    series = data["series"]
    rows = []
    for k, vid in enumerate(data["ids"]):
        row: list[Any] = [f"{vid}*" if vid == data.get("current") else vid]
        for name, _ in FIXED_MEASURES:
            value = series[name][k]
            if value is not None:
                row.append(f"{value:.4f}" if name == "regression_loss" else f"{value:.1%}")
            else:
                row.append("stale: older set" if vid in data["stale"].get(name, []) else "not measured")
        rate = series["canary_thumbs_down_rate"][k]
        row.append(f"{rate:.1%} of {data['canary_rated'][vid]} rated" if rate is not None else
                   "running (canary plot)" if vid == data.get("canary") else "not canaried")
        rating = series["arena_rating"][k]
        row.append(f"{rating:.0f} ({data['arena_games'][vid]} games)" if rating is not None else "no games")
        row.append(data["gate"][k] or "- (no gate: not made by a cycle)")
        rows.append(row)
    return rows


def canary_figure(data: dict[str, Any], points: list[dict[str, Any]]) -> Any:
    """Thumbs-down rate of canary and current over time (cumulative), with 95% interval bands."""
    import datetime as dt

    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.0), layout="constrained")
    ax = fig.add_subplot()
    if not data.get("canary"):
        last = data.get("last")
        text = (f"no canary running; last: {last.get('version')} {last.get('action')} ({last.get('at')})"
                if last else "no canary running")
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
        ax.set_axis_off()
        return fig
    verdict = data["verdict"]
    drawn = False
    for arm, colour in (("canary", "tab:orange"), ("current", "tab:blue")):
        vid = verdict[arm]["version"]
        rows = [p for p in points if p["version"] == vid]
        if not rows:
            continue
        xs = [dt.datetime.fromisoformat(p["at"]) for p in rows]
        ax.plot(xs, [p["rate"] for p in rows], "o-", color=colour, ms=3,
                label=f"{arm} {vid} ({rows[-1]['rated']} rated)")
        ax.fill_between(xs, [p["low"] for p in rows], [p["high"] for p in rows], color=colour, alpha=0.2)
        drawn = True
    ax.set_ylim(0, 1)
    ax.set_ylabel("thumbs-down rate")
    ax.set_title(f"canary {data['canary']}: {verdict['decision']}", fontsize=9)
    if drawn:
        ax.legend(loc="upper left", fontsize=8)
        fig.autofmt_xdate()
    else:
        ax.text(0.5, 0.5, "no rated turns yet", ha="center", va="center", transform=ax.transAxes)
    return fig


class VersionsTab:
    """The tab's logic, separate from its widgets so it can be driven directly (tests, scripts)."""

    def __init__(self, ctx: Any, cache: LlamaCache | None = None, rng: random.Random | None = None):
        self.ctx = ctx
        model = ctx.config.model
        self.cache = cache or LlamaCache(max_models=3, n_ctx=model.n_ctx, n_threads=model.n_threads or None)
        self.rng = rng or random.Random()
        self._vote_lock = threading.Lock()
        self._voted: collections.OrderedDict[str, set[tuple[str, str]]] = collections.OrderedDict()

    # -- data ------------------------------------------------------------------------------------

    def servable(self) -> list[Version]:
        """Versions that may answer users: a version whose verification failed never does."""
        return [v for v in self.ctx.registry.list() if (v.verification or {}).get("passed", True)]

    def version_ids(self) -> list[str]:
        return [v.id for v in self.servable()]

    def ratings(self) -> dict[str, dict[str, Any]]:
        return arena.ratings(self.ctx.store.arena_votes(), versions=self.version_ids())

    def ratings_rows(self) -> list[list[Any]]:
        existing = set(self.version_ids())
        board = [(v, s) for v, s in arena.leaderboard(self.ratings()) if v in existing]
        return [[v, s["rating"], s["games"], s["wins"], s["ties"], s["losses"]] for v, s in board]

    def current_id(self) -> str | None:
        try:
            return self.ctx.registry.current_id()
        except RegistryError:  # a damaged pointer: the tab still shows every version (the header says why)
            return None

    def plot_data(self) -> dict[str, Any]:
        """Cached measures, canary outcomes and arena ratings of every version: read, never measured."""
        registry = self.ctx.registry
        try:
            running = registry.canary_id()
        except RegistryError:
            running = None
        return plot_data(registry.list(), self.ratings(), registry.canary_log(), self.current_id(), running)

    def figure(self) -> Any:
        return metrics_figure(self.plot_data())

    def measures_table(self) -> list[list[Any]]:
        return measures_rows(self.plot_data())

    def canary_data(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The canary's status (``loop.core.canary.status``) and its rate timeline; a damaged pointer
        shows as no canary (the CLI names the damage)."""
        try:
            data = canary.status(self.ctx.registry, self.ctx.store, self.ctx.config.rollout)
        except RegistryError:
            return {"canary": None, "last": None}, []
        if not data.get("canary"):
            return data, []
        rows = canary.rated_turns(self.ctx.store, data["canary"], data["current"] or "", data["since"])
        return data, canary.timeline(rows, data["canary"], data["current"] or "")

    def canary_plot(self) -> Any:
        return canary_figure(*self.canary_data())

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        system = self.ctx.config.app.system_prompt
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]

    def answer(self, version_id: str, prompt: str) -> ProbeAnswer:
        """The greedy answer (side by side: reproducible)."""
        version = self.ctx.registry.get(version_id)
        return self.cache.answer(version, self._messages(prompt), max_tokens=self.ctx.config.app.max_tokens)

    def arena_answer(self, version_id: str, prompt: str) -> ProbeAnswer:
        """A sampled answer (the arena: not the greedy one side by side shows)."""
        app = self.ctx.config.app
        temperature = app.temperature if app.temperature > 0 else ARENA_TEMPERATURE
        version = self.ctx.registry.get(version_id)
        return self.cache.answer(version, self._messages(prompt), max_tokens=app.max_tokens, temperature=temperature,
                                 top_p=app.top_p, seed=self.rng.randrange(2**31))

    def voted_pairs(self, voter: str) -> set[tuple[str, str]]:
        with self._vote_lock:
            return set(self._voted.get(voter, ()))

    def _open_pairs(self, voter: str, ids: list[str]) -> list[tuple[str, str]]:
        done = self.voted_pairs(voter)
        return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if _pair(a, b) not in done]

    def _check_prompt(self, prompt: str) -> str:
        prompt = (prompt or "").strip()
        if not prompt:
            raise gr.Error("Type a prompt first.")
        if len(prompt) > self.ctx.config.app.max_message_chars:
            raise gr.Error(f"The prompt is longer than {self.ctx.config.app.max_message_chars} characters.")
        return prompt

    # -- handlers --------------------------------------------------------------------------------

    def refresh(self) -> tuple[Any, Any, Any, Any]:
        ids = self.version_ids()
        current = self.current_id()
        other = next((i for i in reversed(ids) if i != current), current)
        return (self.figure(), gr.update(choices=ids, value=current), gr.update(choices=ids, value=other),
                self.ratings_rows())

    def side_by_side(self, prompt: str, a: str, b: str, arena_state: dict[str, Any] | None = None) -> tuple[str, str]:
        prompt = self._check_prompt(prompt)
        if not a or not b:
            raise gr.Error("Choose two versions.")
        if arena_state and not arena_state.get("voted") and arena_state.get("prompt") == prompt:
            raise gr.Error("That prompt is open in the blind arena: vote there first, then compare side by side.")
        out = []
        for vid in (a, b):
            r = self.answer(vid, prompt)
            logprob = f", mean logprob {r.mean_logprob:.3f}" if r.mean_logprob is not None else ""
            out.append(f"**{vid}**\n\n{r.answer}\n\n<small>{r.n_tokens} tokens, {r.seconds:.1f} s{logprob}</small>")
        return out[0], out[1]

    def arena_start(self, prompt: str, request: Any = None) -> tuple[dict[str, Any], str, str, Any, str]:
        """Two different versions this session has not voted on yet, in random order, answer anonymously."""
        prompt = self._check_prompt(prompt)
        ids = self.version_ids()
        if len(ids) < 2:
            raise gr.Error("The arena needs at least two versions.")
        voter = _voter(request)
        pairs = self._open_pairs(voter, ids)
        if not pairs:
            raise gr.Error("You have voted on every pair of versions in this session: one vote per pair.")
        a, b = self.rng.sample(list(self.rng.choice(pairs)), 2)
        ans_a, ans_b = self.arena_answer(a, prompt), self.arena_answer(b, prompt)
        state = {"prompt": prompt, "version_a": a, "version_b": b, "answer_a": ans_a.answer, "answer_b": ans_b.answer,
                 "voter": voter}
        return (state, ans_a.answer, ans_b.answer, gr.update(value=None, interactive=True),
                "Which answer is better? The versions are revealed after your vote.")

    def arena_vote(self, choice: str | None, state: dict[str, Any] | None,
                   request: Any = None) -> tuple[dict[str, Any] | None, str, Any, list[list[Any]]]:
        if not state:
            raise gr.Error("Ask a question in the arena first.")
        if choice not in _WINNER:
            raise gr.Error("Pick A, B or Tie.")
        voter, pair = _voter(request), _pair(state["version_a"], state["version_b"])
        if state.get("voter", voter) != voter:
            raise gr.Error("This arena question was asked in another session.")
        with self._vote_lock:  # check and record together: a double click or a second tab must not count twice
            if state.get("voted"):
                raise gr.Error("Already counted; ask another question.")
            if pair in self._voted.get(voter, ()):
                raise gr.Error("You have already voted on this pair of versions in this session: one vote per pair.")
            state["voted"] = True
            self._voted.setdefault(voter, set()).add(pair)
            self._voted.move_to_end(voter)
            while len(self._voted) > MAX_TRACKED_SESSIONS:
                self._voted.popitem(last=False)
        self.ctx.store.add_arena_vote(state["prompt"], state["version_a"], state["version_b"],
                                      state["answer_a"], state["answer_b"], _WINNER[choice])
        reveal = f"Thanks! A was **{state['version_a']}**, B was **{state['version_b']}**."
        return None, reveal, gr.update(interactive=False), self.ratings_rows()


def build_versions_tab(ctx: Any, *, label: str = "Versions") -> VersionsTab:
    """Create the tab inside the current Blocks; returns its logic with the widgets attached."""
    logic = VersionsTab(ctx)
    figure, init_a, init_b, rows = logic.refresh()  # initial state; refreshed whenever the tab is opened
    with gr.Tab(label) as tab:
        gr.Markdown("Compare the model versions the loop has produced. The one marked * is serving the chat.")
        plot = gr.Plot(value=figure, label="Every version on the same fixed measures")
        table = gr.Dataframe(value=logic.measures_table(), headers=MEASURE_COLUMNS, interactive=False,
                             label="Fixed measures, and each cycle's held-out loss as its gate compared it")
        canary_plot = gr.Plot(value=logic.canary_plot(), label="Canary: thumbs-down rate (95% intervals)")
        refresh_btn = gr.Button("Refresh", size="sm")
        with gr.Accordion("Side by side", open=True):
            with gr.Row():
                pick_a = gr.Dropdown(label="Version 1", choices=init_a["choices"], value=init_a["value"])
                pick_b = gr.Dropdown(label="Version 2", choices=init_b["choices"], value=init_b["value"])
            sbs_prompt = gr.Textbox(label="Prompt", lines=2)
            sbs_btn = gr.Button("Answer with both")
            with gr.Row():
                sbs_a = gr.Markdown()
                sbs_b = gr.Markdown()
        with gr.Accordion("Blind arena", open=True):
            arena_state = gr.State(None)
            arena_prompt = gr.Textbox(label="Ask both anonymous versions", lines=2)
            arena_btn = gr.Button("Ask")
            with gr.Row():
                arena_a = gr.Textbox(label="A", interactive=False, lines=6)
                arena_b = gr.Textbox(label="B", interactive=False, lines=6)
            vote = gr.Radio(ARENA_CHOICES, label="Your vote", interactive=False)
            vote_btn = gr.Button("Vote")
            arena_msg = gr.Markdown()
            board = gr.Dataframe(value=rows or None, headers=["version", "rating", "games", "wins", "ties", "losses"],
                                 label="Arena ratings (Bradley-Terry, Elo scale)", interactive=False)

    # Endpoint names are prefixed so they cannot collide with the chat's; the arena's stay
    # undocumented (callable, but not advertised as an API for scripted voting).
    outputs = [plot, pick_a, pick_b, board]
    def arena_ask(prompt: str, request: gr.Request):
        return logic.arena_start(prompt, request)

    def arena_vote(choice: str | None, state: dict[str, Any] | None, request: gr.Request):
        return logic.arena_vote(choice, state, request)

    tab.select(user_safe(logic.refresh), None, outputs, api_visibility="private")
    refresh_btn.click(user_safe(logic.refresh), None, outputs, api_name="versions_refresh")
    tab.select(user_safe(logic.canary_plot), None, [canary_plot], api_visibility="private")
    tab.select(user_safe(logic.measures_table), None, [table], api_visibility="private")
    refresh_btn.click(user_safe(logic.measures_table), None, [table], api_visibility="private")
    refresh_btn.click(user_safe(logic.canary_plot), None, [canary_plot], api_visibility="private")
    sbs_btn.click(user_safe(logic.side_by_side), [sbs_prompt, pick_a, pick_b, arena_state], [sbs_a, sbs_b],
                  concurrency_id="generate", api_name="versions_side_by_side")
    arena_btn.click(user_safe(arena_ask), [arena_prompt], [arena_state, arena_a, arena_b, vote, arena_msg],
                    concurrency_id="generate", api_name="versions_arena_ask", api_visibility="undocumented")
    vote_btn.click(user_safe(arena_vote), [vote, arena_state], [arena_state, arena_msg, vote, board],
                   api_name="versions_arena_vote", api_visibility="undocumented")
    logic.tab = tab
    logic.components = {"plot": plot, "measures": table, "canary_plot": canary_plot, "pick_a": pick_a,
                        "pick_b": pick_b, "board": board, "vote": vote, "arena_a": arena_a, "arena_b": arena_b}
    return logic
