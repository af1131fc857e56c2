"""A space of dense and the very same structure under another name ("twin"): the verdict's null test."""

from search.families.dense import Dense


class Twin(Dense):
    name = label = group = "twin"

    def structure_label(self, args) -> str:
        return "twin"


SPACE = ["dense", Twin()]
