"""Role prefixes and suffixes taken from the model's own chat template.

A program builds its prompt turn by turn (``s += user(...)``), so it needs, per
role, the text the model's template puts before and after a message. They are
read off the template itself: render a conversation whose messages are
sentinels and cut the rendering at them. The DSL then writes exactly what
``tokenizer.apply_chat_template`` (and so ``/v1/chat/completions``) renders
for the same messages, including the template's default system prompt.

Templates that are not turn-by-turn (a system message folded into the first
user turn, say) cannot be cut this way; they fall back to a plain
``ROLE: text`` layout, with a warning.

A vision-language model's template takes each message's content as a list of
parts (``{"type": "text", ...}``, ``{"type": "image"}``): ``content_parts`` says
so, and the sentinels are sent as text parts. What it writes for an image part
is read off it too (``image_token``), and so is a role prefix that changes when
the content starts with an image (SmolVLM writes ``User:<image>`` but ``User: text``).
A generation prompt that is the assistant prefix without its trailing space
(SmolVLM's ``Assistant:``) becomes the assistant prefix, so a ``gen`` starts where
the model was trained to continue.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_SENTINEL = {"system": "\x02SYS\x03", "user": "\x02USR\x03", "assistant": "\x02AST\x03"}


@dataclass(frozen=True)
class ChatTemplate:
    # role -> (prefix, suffix) around the message content
    roles: dict[str, tuple[str, str]]
    default_system_prompt: str | None = None
    # Stop strings added to a gen inside an assistant turn (the end-of-turn marker).
    stop_str: tuple[str, ...] = ()
    # Text once at the start of a conversation (a BOS the template writes itself).
    begin: str = ""
    image_token: str = "<image>"  # what the template writes for an image part
    name: str = "model"
    extra: dict[str, Any] = field(default_factory=dict)
    # The template takes content as a list of text and image parts (not a string).
    content_parts: bool = False
    # role -> the prefix written instead of prefix(role) when the content opens with
    # an image.
    image_first_prefix: dict[str, str] = field(default_factory=dict)

    def prefix(self, role: str) -> str:
        return self._role(role)[0]

    def suffix(self, role: str) -> str:
        return self._role(role)[1]

    def _role(self, role: str) -> tuple[str, str]:
        if role not in self.roles:
            raise ValueError(f"role={role!r}: the chat template knows {sorted(self.roles)}")
        return self.roles[role]

    def render(self, messages: list[dict[str, str]]) -> str:
        """The text of a conversation, as the program state writes it."""
        out = [self.begin]
        if self.default_system_prompt is not None and (
            not messages or messages[0]["role"] != "system"
        ):
            out.append(self._wrap("system", self.default_system_prompt))
        out += [self._wrap(m["role"], m["content"]) for m in messages]
        return "".join(out)

    def _wrap(self, role: str, content: str) -> str:
        prefix, suffix = self._role(role)
        return prefix + content + suffix

    def to_dict(self) -> dict[str, Any]:
        return {
            "roles": {r: list(ps) for r, ps in self.roles.items()},
            "default_system_prompt": self.default_system_prompt,
            "stop_str": list(self.stop_str),
            "begin": self.begin,
            "image_token": self.image_token,
            "name": self.name,
            "content_parts": self.content_parts,
            "image_first_prefix": dict(self.image_first_prefix),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatTemplate:
        return cls(
            roles={r: (ps[0], ps[1]) for r, ps in d["roles"].items()},
            default_system_prompt=d.get("default_system_prompt"),
            stop_str=tuple(d.get("stop_str", ())),
            begin=d.get("begin", ""),
            image_token=d.get("image_token", "<image>"),
            name=d.get("name", "model"),
            content_parts=bool(d.get("content_parts", False)),
            image_first_prefix=dict(d.get("image_first_prefix") or {}),
        )

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTemplate:
        """Derive the roles from ``tokenizer``'s chat template (plain if it has none)."""
        if not getattr(tokenizer, "chat_template", None):
            return PLAIN
        parts = _takes_parts(tokenizer)
        try:
            return _derive(tokenizer, parts)
        except Exception as e:  # any template shape we cannot cut at turn boundaries
            logger.warning("chat template is not turn-by-turn (%s); using a plain layout", e)
            return dataclasses.replace(PLAIN, content_parts=parts)


PLAIN = ChatTemplate(
    roles={
        "system": ("SYSTEM: ", "\n"),
        "user": ("USER: ", "\n"),
        "assistant": ("ASSISTANT: ", "\n"),
    },
    name="plain",
)


def _takes_parts(tokenizer: Any) -> bool:
    """Whether the template needs content as parts: text content does not show."""
    messages = [{"role": "user", "content": _SENTINEL["user"]}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that indexes into the content's parts
        return True
    return _SENTINEL["user"] not in text


def _derive(tokenizer: Any, parts: bool = False) -> ChatTemplate:
    def content(role: str, images: int = 0) -> Any:
        if not parts:
            return _SENTINEL[role]
        return [{"type": "image"}] * images + [{"type": "text", "text": _SENTINEL[role]}]

    def render(roles: list[str], generation: bool = False, images: int = 0) -> str:
        messages = [
            {"role": r, "content": content(r, images if k == len(roles) - 1 else 0)}
            for k, r in enumerate(roles)
        ]
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )

    s, su, sua = (
        render(["system"]),
        render(["system", "user"]),
        render(["system", "user", "assistant"]),
    )
    if not (su.startswith(s) and sua.startswith(su)):
        raise ValueError("a later turn changes the rendering of earlier ones")
    # A BOS written once at the start (Llama 3), not one that opens every turn (ChatML).
    begin = ""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and s.startswith(bos) and not su[len(s) :].startswith(bos):
        begin = bos
    roles = {
        "system": _cut(s[len(begin) :], "system"),
        "user": _cut(su[len(s) :], "user"),
        "assistant": _cut(sua[len(su) :], "assistant"),
    }
    generation_prompt = render(["system", "user"], generation=True)[len(su) :]
    prefix = roles["assistant"][0]
    if (
        generation_prompt
        and prefix.startswith(generation_prompt)
        and not prefix[len(generation_prompt) :].strip()
    ):
        roles["assistant"] = (generation_prompt, roles["assistant"][1])
    elif generation_prompt and generation_prompt != roles["assistant"][0]:
        raise ValueError(
            f"generation prompt {generation_prompt!r} differs from the assistant prefix "
            f"{roles['assistant'][0]!r}"
        )
    # What the template writes before a conversation that starts with the user.
    head = render(["user"])[len(begin) :]
    user_turn = roles["user"][0] + _SENTINEL["user"] + roles["user"][1]
    if not head.endswith(user_turn):
        raise ValueError("the first user turn renders differently from later ones")
    head = head[: -len(user_turn)]
    default_system = None
    if head:
        prefix, suffix = roles["system"]
        if not (head.startswith(prefix) and head.endswith(suffix)):
            raise ValueError(f"unrecognized text before the first user turn: {head!r}")
        default_system = head[len(prefix) : len(head) - len(suffix)]
    end_of_turn = roles["assistant"][1].strip()
    stop = (end_of_turn,) if end_of_turn else ()
    if not stop and getattr(tokenizer, "eos_token", None):
        stop = (tokenizer.eos_token,)
    name = getattr(tokenizer, "name_or_path", "") or "model"
    template = ChatTemplate(roles, default_system, stop, begin, name=str(name))
    if not parts:
        return template
    image_token, image_first = "<image>", {}
    try:
        starts = {"system": len(begin), "user": len(s), "assistant": len(su)}
        turns = {"system": ["system"], "user": ["system", "user"]}
        turns["assistant"] = ["system", "user", "assistant"]
        for role, roles_so_far in turns.items():
            one = render(roles_so_far, images=1)[starts[role] :]
            two = render(roles_so_far, images=2)[starts[role] :]
            head1, head2 = (t[: t.index(_SENTINEL[role])] for t in (one, two))
            image_token = head2[len(head1) :]
            if not image_token or not head1.endswith(image_token):
                raise ValueError(f"the {role} turn does not write each image the same way")
            opening = head1[: -len(image_token)]
            if opening != roles[role][0]:
                image_first[role] = opening
    except Exception as e:  # images then go where the default image token is written
        logger.warning("cannot read how the chat template writes images (%s)", e)
        image_token, image_first = "<image>", {}
    return dataclasses.replace(
        template, content_parts=True, image_token=image_token, image_first_prefix=image_first
    )


def _cut(block: str, role: str) -> tuple[str, str]:
    sentinel = _SENTINEL[role]
    if block.count(sentinel) != 1:
        raise ValueError(f"the {role} turn does not render its content exactly once")
    prefix, suffix = block.split(sentinel)
    return prefix, suffix
