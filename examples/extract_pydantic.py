"""Structured extraction into a pydantic model: the output is constrained to the
model's JSON schema while it is generated, and ``s.parsed(name)`` returns the
validated object.

    python examples/extract_pydantic.py
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

import plait as pl


class Contact(BaseModel):
    name: str
    email: str
    company: str
    role: Literal["engineer", "manager", "designer", "other"]
    years_experience: int = Field(ge=0, le=60)


@pl.function
def extract(s, text):
    s += pl.system("Extract the contact details from the text as JSON.")
    s += pl.user(text)
    s += pl.assistant(pl.gen("contact", json_schema=Contact, max_tokens=96))


def main() -> None:
    pl.set_default_backend(pl.Engine(model="smollm2"))
    notes = [
        "Hi, I'm Maria Lopez, a manager at Acme Corp (maria.lopez@acme.com). "
        "I have been leading teams for 12 years.",
        "Contact: Tom Becker <tom@pixelworks.io>, designer at Pixelworks, 4 years in the field.",
    ]
    for state in extract.run_batch([{"text": t} for t in notes], temperature=0):
        contact = state.parsed("contact")
        print(repr(contact))


if __name__ == "__main__":
    main()
