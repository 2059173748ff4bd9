"""Seeded synthetic function-calling records in exactly the xLAM function-calling-60k schema.

Each record is ``{"id": int, "query": str, "tools": <JSON string>, "answers": <JSON string>}``
with xLAM's free-form parameter types (``"str"``, ``"int, optional"``, ``"List[int]"``,
``"Dict[str, Any]"``...) and ``default`` keys, so the whole function-calling pipeline runs
offline. The catalog spans weather, finance, maths, text, shopping, maps, sports, media,
calendar, health, cooking, social, units, dates, web, settings and news tools; arguments
cover str/int/float/bool/list/dict values, nested lists and objects, and optional
parameters (with and without defaults) that are included in roughly 40% of calls.

A query asks for one to three calls (sometimes the same tool twice, as in xLAM's parallel
calls); each call's sentence comes from a per-tool template that states every argument value
literally, so the gold answer is recoverable from the query. The tool list holds the called
tools plus up to three distractors, shuffled.

``python -m reflax.tasks.xlam_synthetic --num 200 --seed 0 --out FILE`` writes JSON lines;
``reflax/tasks/data/xlam_synthetic_sample.jsonl`` is exactly that output for 200 records, seed 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

Sampler = Callable[[random.Random], Any]
_NO_DEFAULT = object()


@dataclasses.dataclass(frozen=True)
class Param:
    """One tool parameter: xLAM type text, a value sampler and how a value reads in a query."""

    name: str
    type: str
    description: str
    sample: Sampler
    default: Any = _NO_DEFAULT
    # For optional parameters: the phrase added to the query when the argument is given.
    phrase: Callable[[Any], str] | None = None
    # How a required argument's value is written into the query template.
    show: Callable[[Any], str] | None = None

    @property
    def optional(self) -> bool:
        return self.default is not _NO_DEFAULT or "optional" in self.type.lower()


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """A tool and the query templates that ask for a call to it.

    Templates name every required parameter as ``{param}`` and end with ``{opts}``, where the
    phrases of the optional arguments that were included go.
    """

    name: str
    description: str
    params: tuple[Param, ...]
    templates: tuple[str, ...]

    def xlam(self) -> dict:
        """The tool in xLAM form."""
        parameters = {}
        for param in self.params:
            spec: dict[str, Any] = {"description": param.description, "type": param.type}
            if param.default is not _NO_DEFAULT:
                spec["default"] = param.default
            parameters[param.name] = spec
        return {"name": self.name, "description": self.description, "parameters": parameters}


# ------------------------------------------------------------------------ value samplers
CITIES = [
    "Paris",
    "Tokyo",
    "Nairobi",
    "Lima",
    "Oslo",
    "Toronto",
    "Sydney",
    "Cairo",
    "Seoul",
    "Lisbon",
    "Denver",
    "Mumbai",
    "Berlin",
    "Santiago",
    "Reykjavik",
    "Hanoi",
]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CAD", "AUD", "CHF", "INR", "BRL", "ZAR"]
SYMBOLS = ["AAPL", "MSFT", "GOOGL", "AMZN", "TSLA", "NVDA", "META", "IBM", "NFLX", "ORCL"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Japanese", "Portuguese", "Korean"]
ARTISTS = [
    "Nina Simone",
    "Miles Davis",
    "Adele",
    "Bob Marley",
    "Fela Kuti",
    "Bjork",
    "Ella Fitzgerald",
    "Ravi Shankar",
]
MOVIES = [
    "The Silent Harbor",
    "Glass Orchard",
    "Midnight Cartographer",
    "Paper Moons",
    "The Last Lighthouse",
    "Copper Skies",
]
TEAMS = [
    "Boston Harbors",
    "Denver Peaks",
    "Austin Comets",
    "Seattle Tides",
    "Chicago Foxes",
    "Miami Herons",
]
USERNAMES = ["skyler_88", "data_diva", "mountainmike", "pixelpainter", "quiet_coder", "laura.reads"]
INGREDIENTS = [
    "tomatoes",
    "basil",
    "chickpeas",
    "spinach",
    "garlic",
    "rice",
    "lentils",
    "mushrooms",
    "eggs",
    "feta",
    "lemon",
    "ginger",
]
WORDS = [
    "the",
    "river",
    "quick",
    "light",
    "falls",
    "over",
    "green",
    "stone",
    "and",
    "wind",
    "carries",
    "small",
    "boats",
    "home",
    "every",
    "morning",
]
PHRASES = [
    "Good morning, how are you?",
    "Where is the train station?",
    "Thank you for your help.",
    "The museum opens at nine.",
    "I would like a coffee.",
]
PRODUCTS = [
    "wireless headphones",
    "running shoes",
    "standing desk",
    "coffee grinder",
    "yoga mat",
    "backpack",
    "desk lamp",
]
BRANDS = ["Acme", "Northwind", "Zephyr", "Lumen", "Orbit"]
PLACE_TYPES = ["restaurant", "pharmacy", "museum", "park", "cafe", "hotel", "library"]
UNIT_PAIRS = [
    ("kilograms", "pounds"),
    ("meters", "feet"),
    ("celsius", "fahrenheit"),
    ("liters", "gallons"),
    ("kilometers", "miles"),
    ("ounces", "grams"),
]
TOPICS = [
    "renewable energy",
    "space exploration",
    "electric cars",
    "public health",
    "machine learning",
    "ocean conservation",
]
DOMAINS = ["example.com", "status.example.org", "shop.example.net", "docs.example.io"]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"]
STREETS = [
    "221B Baker Street, London",
    "1600 Amphitheatre Parkway, Mountain View",
    "5 Avenue Anatole France, Paris",
    "350 Fifth Avenue, New York",
]


def _pick(options: list) -> Sampler:
    return lambda rng: rng.choice(options)


def _int(lo: int, hi: int) -> Sampler:
    return lambda rng: rng.randint(lo, hi)


def _float(lo: float, hi: float, digits: int = 2) -> Sampler:
    return lambda rng: round(rng.uniform(lo, hi), digits)


def _bool(rng: random.Random) -> bool:
    return rng.random() < 0.5


def _date(rng: random.Random) -> str:
    return f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))


def _numbers(rng: random.Random) -> list:
    return [
        rng.randint(0, 50) if rng.random() < 0.5 else round(rng.uniform(0, 50), 1)
        for _ in range(rng.randint(3, 7))
    ]


def _int_list(rng: random.Random) -> list[int]:
    return [rng.randint(-20, 99) for _ in range(rng.randint(3, 8))]


def _matrix(rows: int, cols: int) -> Sampler:
    return lambda rng: [[rng.randint(-9, 9) for _ in range(cols)] for _ in range(rows)]


def _sample_unique(options: list, lo: int, hi: int) -> Sampler:
    return lambda rng: rng.sample(options, rng.randint(lo, hi))


def _emails(rng: random.Random) -> list[str]:
    return [f"{name}@example.com" for name in rng.sample(NAMES, rng.randint(1, 3))]


def _order_items(rng: random.Random) -> list[dict]:
    return [
        {"sku": f"SKU-{rng.randint(1000, 9999)}", "quantity": rng.randint(1, 5)}
        for _ in range(rng.randint(1, 3))
    ]


def _filters(rng: random.Random) -> dict:
    candidates = {
        "max_price": round(rng.uniform(10, 500), 2),
        "brand": rng.choice(BRANDS),
        "in_stock": _bool(rng),
        "min_rating": rng.randint(1, 5),
    }
    keys = rng.sample(sorted(candidates), rng.randint(1, 3))
    return {key: candidates[key] for key in sorted(keys)}


def _settings(rng: random.Random) -> dict:
    settings: dict[str, Any] = {"theme": rng.choice(["dark", "light", "system"])}
    if rng.random() < 0.7:
        settings["notifications"] = {"email": _bool(rng), "sms": _bool(rng)}
    if rng.random() < 0.5:
        settings["language"] = rng.choice(["en", "fr", "es", "de", "ja"])
    if rng.random() < 0.3:
        settings["favorite_tags"] = rng.sample(["news", "sports", "tech", "food", "travel"], 2)
    return settings


# ---------------------------------------------------------------------- query rendering
def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _and_list(values: list) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _quoted(value: str) -> str:
    return f"'{value}'"


def _show(value: Any) -> str:
    if isinstance(value, list | dict):
        return _json(value)
    return str(value)


def _bool_phrase(yes: str, no: str) -> Callable[[Any], str]:
    return lambda value: yes if value else no


# -------------------------------------------------------------------------------- catalog
def _p(name: str, type_: str, description: str, sample: Sampler, **kwargs: Any) -> Param:
    return Param(name=name, type=type_, description=description, sample=sample, **kwargs)


CATALOG: tuple[ToolSpec, ...] = (
    ToolSpec(
        "get_current_weather",
        "Get the current weather conditions for a city.",
        (
            _p("city", "str", "Name of the city.", _pick(CITIES)),
            _p(
                "units",
                "str, optional",
                "Unit system: 'metric' or 'imperial'.",
                _pick(["metric", "imperial"]),
                default="metric",
                phrase=lambda v: f" in {v} units",
            ),
        ),
        (
            "What's the weather like in {city}{opts}?",
            "Tell me the current weather in {city}{opts}.",
        ),
    ),
    ToolSpec(
        "get_forecast",
        "Get a multi-day weather forecast for a city.",
        (
            _p("city", "str", "Name of the city.", _pick(CITIES)),
            _p("days", "int", "Number of days to forecast (1-14).", _int(1, 14)),
            _p(
                "include_hourly",
                "bool, optional",
                "Whether to include hourly details.",
                _bool,
                default=False,
                phrase=_bool_phrase(" with hourly details", " without hourly details"),
            ),
        ),
        (
            "Give me the {days}-day forecast for {city}{opts}.",
            "What will the weather be in {city} over the next {days} days{opts}?",
        ),
    ),
    ToolSpec(
        "get_stock_quote",
        "Fetch the latest trading price for a stock ticker symbol.",
        (_p("symbol", "str", "Stock ticker symbol, e.g. 'AAPL'.", _pick(SYMBOLS)),),
        (
            "What is the latest stock price of {symbol}{opts}?",
            "Get me a quote for {symbol} shares{opts}.",
        ),
    ),
    ToolSpec(
        "convert_currency",
        "Convert an amount of money from one currency to another.",
        (
            _p("amount", "float", "The amount to convert.", _float(1, 5000)),
            _p("from_currency", "str", "ISO code of the source currency.", _pick(CURRENCIES)),
            _p("to_currency", "str", "ISO code of the target currency.", _pick(CURRENCIES)),
        ),
        (
            "Convert {amount} {from_currency} to {to_currency}{opts}.",
            "How much is {amount} {from_currency} in {to_currency}{opts}?",
        ),
    ),
    ToolSpec(
        "calculate_loan_payment",
        "Calculate the periodic payment of an amortised loan.",
        (
            _p("principal", "float", "The loan amount.", _float(1000, 500000, 0)),
            _p("annual_rate", "float", "Annual interest rate in percent.", _float(0.5, 12, 2)),
            _p("years", "int", "Loan term in years.", _int(1, 30)),
            _p(
                "compounding",
                "str, optional",
                "Compounding period.",
                _pick(["daily", "monthly", "quarterly", "annually"]),
                default="monthly",
                phrase=lambda v: f", compounded {v}",
            ),
        ),
        (
            "What is the payment on a {principal} loan at {annual_rate}% annual interest over "
            "{years} years{opts}?",
            "Calculate my loan payment for a principal of {principal}, a rate of {annual_rate}% "
            "and a term of {years} years{opts}.",
        ),
    ),
    ToolSpec(
        "calculate_average",
        "Compute the arithmetic mean of a list of numbers.",
        (_p("numbers", "List[Union[int, float]]", "The numbers to average.", _numbers),),
        (
            "Find the average of {numbers}{opts}.",
            "What is the mean of the numbers {numbers}{opts}?",
        ),
    ),
    ToolSpec(
        "is_prime",
        "Check whether an integer is a prime number.",
        (_p("number", "int", "The integer to test.", _int(2, 100000)),),
        ("Is {number} a prime number{opts}?", "Check whether {number} is prime{opts}."),
    ),
    ToolSpec(
        "matrix_multiply",
        "Multiply two matrices given as lists of rows.",
        (
            _p("matrix_a", "List[List[int]]", "The left matrix.", _matrix(2, 3)),
            _p("matrix_b", "List[List[int]]", "The right matrix.", _matrix(3, 2)),
        ),
        (
            "Multiply the matrices {matrix_a} and {matrix_b}{opts}.",
            "What is the product of matrix {matrix_a} with matrix {matrix_b}{opts}?",
        ),
    ),
    ToolSpec(
        "count_word_frequency",
        "Count how often each word occurs in a text.",
        (
            _p("text", "str", "The text to analyse.", _sentence, show=_quoted),
            _p(
                "ignore_case",
                "bool, optional",
                "Whether to ignore letter case.",
                _bool,
                default=True,
                phrase=_bool_phrase(
                    " ignoring case", " treating upper and lower case as different"
                ),
            ),
        ),
        (
            "Count how often each word appears in the text {text}{opts}.",
            "Give me the word frequencies of {text}{opts}.",
        ),
    ),
    ToolSpec(
        "translate_text",
        "Translate a text into another language.",
        (
            _p("text", "str", "The text to translate.", _pick(PHRASES), show=_quoted),
            _p("target_language", "str", "Language to translate into.", _pick(LANGUAGES)),
            _p(
                "source_language",
                "str, optional",
                "Language of the text; 'auto' to detect.",
                _pick(["English", "Dutch", "Swedish"]),
                default="auto",
                phrase=lambda v: f" from {v}",
            ),
        ),
        (
            "Translate {text} into {target_language}{opts}.",
            "How do you say {text} in {target_language}{opts}?",
        ),
    ),
    ToolSpec(
        "search_products",
        "Search the product catalog, optionally narrowing the results with filters.",
        (
            _p("query", "str", "Search terms.", _pick(PRODUCTS)),
            _p(
                "filters",
                "Dict[str, Any], optional",
                "Filters: max_price (float), brand (str), in_stock (bool), min_rating (int).",
                _filters,
                phrase=lambda v: f" with the filters {_json(v)}",
            ),
        ),
        ("Search the store for {query}{opts}.", "Show me {query} products{opts}."),
    ),
    ToolSpec(
        "place_order",
        "Place an order for a customer.",
        (
            _p(
                "customer_id",
                "str",
                "The customer's identifier.",
                lambda rng: f"C{rng.randint(10000, 99999)}",
            ),
            _p(
                "items",
                "List[Dict]",
                "Items to order, each with 'sku' (str) and 'quantity' (int).",
                _order_items,
            ),
            _p(
                "express_shipping",
                "bool, optional",
                "Whether to ship express.",
                _bool,
                default=False,
                phrase=_bool_phrase(" using express shipping", " with standard shipping"),
            ),
        ),
        (
            "Place an order for customer {customer_id} with the items {items}{opts}.",
            "Order {items} for customer {customer_id}{opts}.",
        ),
    ),
    ToolSpec(
        "get_distance",
        "Get the travel distance between two places.",
        (
            _p("origin", "str", "Starting place.", _pick(CITIES)),
            _p("destination", "str", "Destination place.", _pick(CITIES)),
            _p(
                "unit",
                "str, optional",
                "Distance unit: 'km' or 'miles'.",
                _pick(["km", "miles"]),
                default="km",
                phrase=lambda v: f" in {v}",
            ),
        ),
        (
            "How far is it from {origin} to {destination}{opts}?",
            "What's the distance between {origin} and {destination}{opts}?",
        ),
    ),
    ToolSpec(
        "find_nearby_places",
        "Find places of a given type around a coordinate.",
        (
            _p("latitude", "float", "Latitude in degrees.", _float(-60, 60, 4)),
            _p("longitude", "float", "Longitude in degrees.", _float(-170, 170, 4)),
            _p("place_type", "str", "Kind of place, e.g. 'cafe'.", _pick(PLACE_TYPES)),
            _p(
                "radius",
                "int, optional",
                "Search radius in meters.",
                _int(100, 5000),
                default=1000,
                phrase=lambda v: f" within {v} meters",
            ),
        ),
        (
            "Find places of type {place_type} near latitude {latitude} and longitude "
            "{longitude}{opts}.",
            "Are there any places of type {place_type} around ({latitude}, {longitude}){opts}?",
        ),
    ),
    ToolSpec(
        "get_team_schedule",
        "Get a sports team's game schedule for a season.",
        (
            _p("team", "str", "Team name.", _pick(TEAMS)),
            _p("season", "int", "Season year.", _int(2015, 2025)),
        ),
        (
            "Show me the {season} schedule for the {team}{opts}.",
            "When do the {team} play in the {season} season{opts}?",
        ),
    ),
    ToolSpec(
        "search_songs",
        "Search for songs by an artist.",
        (
            _p("artist", "str", "Artist name.", _pick(ARTISTS)),
            _p(
                "limit",
                "int, optional",
                "Maximum number of results.",
                _int(1, 50),
                default=10,
                phrase=lambda v: f", returning at most {v} results",
            ),
        ),
        ("Find songs by {artist}{opts}.", "What songs has {artist} recorded{opts}?"),
    ),
    ToolSpec(
        "get_movie_details",
        "Look up details about a movie.",
        (
            _p("title", "str", "Movie title.", _pick(MOVIES), show=_quoted),
            _p(
                "year",
                "int, optional",
                "Release year, to disambiguate.",
                _int(1970, 2024),
                phrase=lambda v: f" released in {v}",
            ),
        ),
        ("Get details about the movie {title}{opts}.", "Tell me about the film {title}{opts}."),
    ),
    ToolSpec(
        "create_event",
        "Create a calendar event.",
        (
            _p(
                "title",
                "str",
                "Event title.",
                _pick(["Team sync", "Budget review", "Lunch", "Design critique", "Retro"]),
                show=_quoted,
            ),
            _p("date", "str", "Date in YYYY-MM-DD format.", _date),
            _p(
                "attendees",
                "List[str]",
                "E-mail addresses of the attendees.",
                _emails,
                show=_and_list,
            ),
            _p(
                "reminder_minutes",
                "int, optional",
                "Minutes before the event to remind.",
                _int(5, 120),
                default=15,
                phrase=lambda v: f" and a reminder {v} minutes before",
            ),
        ),
        (
            "Create an event called {title} on {date} with {attendees}{opts}.",
            "Schedule {title} for {date} and invite {attendees}{opts}.",
        ),
    ),
    ToolSpec(
        "calculate_bmi",
        "Calculate the body mass index.",
        (
            _p("weight_kg", "float", "Body weight in kilograms.", _float(40, 130, 1)),
            _p("height_m", "float", "Height in meters.", _float(1.4, 2.1, 2)),
        ),
        (
            "What is the BMI of someone who weighs {weight_kg} kg and is {height_m} m tall{opts}?",
            "Calculate the BMI for {weight_kg} kg at {height_m} m{opts}.",
        ),
    ),
    ToolSpec(
        "find_recipes",
        "Find recipes that use the given ingredients.",
        (
            _p(
                "ingredients",
                "List[str]",
                "Ingredients to use.",
                _sample_unique(INGREDIENTS, 1, 4),
                show=_and_list,
            ),
            _p(
                "max_time_minutes",
                "int, optional",
                "Maximum preparation time in minutes.",
                _int(10, 120),
                default=60,
                phrase=lambda v: f" that take at most {v} minutes",
            ),
            _p(
                "vegetarian",
                "bool, optional",
                "Only vegetarian recipes.",
                _bool,
                default=False,
                phrase=_bool_phrase(", vegetarian only", ", vegetarian or not"),
            ),
        ),
        ("Suggest recipes using {ingredients}{opts}.", "What can I cook with {ingredients}{opts}?"),
    ),
    ToolSpec(
        "get_user_posts",
        "Fetch the most recent posts of a social media user.",
        (
            _p("username", "str", "The user's handle.", _pick(USERNAMES)),
            _p(
                "count",
                "int, optional",
                "How many posts to fetch.",
                _int(1, 100),
                default=20,
                phrase=lambda v: f", {v} of them",
            ),
        ),
        (
            "Fetch the latest posts from user {username}{opts}.",
            "Show me what {username} posted recently{opts}.",
        ),
    ),
    ToolSpec(
        "convert_units",
        "Convert a quantity between measurement units.",
        (
            _p("value", "float", "The quantity to convert.", _float(0.1, 1000, 1)),
            _p("from_unit", "str", "Unit of the quantity.", _pick([a for a, _ in UNIT_PAIRS])),
            _p("to_unit", "str", "Unit to convert into.", _pick([b for _, b in UNIT_PAIRS])),
        ),
        (
            "Convert {value} {from_unit} to {to_unit}{opts}.",
            "How many {to_unit} is {value} {from_unit}{opts}?",
        ),
    ),
    ToolSpec(
        "sort_list",
        "Sort a list of integers.",
        (
            _p("items", "List[int]", "The integers to sort.", _int_list),
            _p(
                "descending",
                "bool, optional",
                "Sort from largest to smallest.",
                _bool,
                default=False,
                phrase=_bool_phrase(" in descending order", " in ascending order"),
            ),
        ),
        ("Sort the list {items}{opts}.", "Please order the numbers {items}{opts}."),
    ),
    ToolSpec(
        "days_between",
        "Count the days between two dates.",
        (
            _p("start_date", "str", "First date, YYYY-MM-DD.", _date),
            _p("end_date", "str", "Second date, YYYY-MM-DD.", _date),
        ),
        (
            "How many days are there between {start_date} and {end_date}{opts}?",
            "Count the days from {start_date} to {end_date}{opts}.",
        ),
    ),
    ToolSpec(
        "check_website_status",
        "Check whether a website is reachable.",
        (
            _p("url", "str", "The URL to check.", lambda rng: f"https://{rng.choice(DOMAINS)}"),
            _p(
                "timeout",
                "float, optional",
                "Timeout in seconds.",
                _float(0.5, 30, 1),
                default=5.0,
                phrase=lambda v: f" with a timeout of {v} seconds",
            ),
        ),
        ("Check whether {url} is up{opts}.", "Is {url} reachable right now{opts}?"),
    ),
    ToolSpec(
        "update_settings",
        "Update a user's account settings.",
        (
            _p("user_id", "int", "The user's numeric id.", _int(1, 99999)),
            _p("settings", "Dict", "Settings to change; nested objects are merged.", _settings),
        ),
        (
            "Update the settings of user {user_id} to {settings}{opts}.",
            "For user {user_id}, apply the settings {settings}{opts}.",
        ),
    ),
    ToolSpec(
        "get_exchange_rates",
        "Get exchange rates from a base currency.",
        (
            _p("base", "str", "Base currency ISO code.", _pick(CURRENCIES)),
            _p(
                "symbols",
                "List[str], optional",
                "Currencies to quote; all when omitted.",
                _sample_unique(CURRENCIES, 1, 3),
                phrase=lambda v: f" against {_and_list(v)}",
            ),
        ),
        ("Get exchange rates for {base}{opts}.", "What are today's rates for {base}{opts}?"),
    ),
    ToolSpec(
        "geocode_address",
        "Find the coordinates of a street address.",
        (_p("address", "str", "The street address.", _pick(STREETS)),),
        ("What are the coordinates of {address}{opts}?", "Geocode the address {address}{opts}."),
    ),
    ToolSpec(
        "generate_password",
        "Generate a random password.",
        (
            _p("length", "int", "Number of characters.", _int(8, 64)),
            _p(
                "include_symbols",
                "bool, optional",
                "Whether to include symbols.",
                _bool,
                default=True,
                phrase=_bool_phrase(" with symbols", " without symbols"),
            ),
        ),
        (
            "Generate a password of {length} characters{opts}.",
            "I need a new {length}-character password{opts}.",
        ),
    ),
    ToolSpec(
        "set_device_power",
        "Switch a smart-home device on or off.",
        (
            _p(
                "device_id",
                "str",
                "The device identifier.",
                lambda rng: (
                    f"{rng.choice(['lamp', 'heater', 'fan', 'speaker'])}-{rng.randint(1, 9)}"
                ),
            ),
            _p(
                "on",
                "bool",
                "True to switch on, False to switch off.",
                _bool,
                show=lambda v: "on" if v else "off",
            ),
            _p(
                "delay_seconds",
                "int, optional",
                "Wait this long before switching.",
                _int(1, 600),
                default=0,
                phrase=lambda v: f" after {v} seconds",
            ),
        ),
        ("Switch {on} the device {device_id}{opts}.", "Turn device {device_id} {on}{opts}."),
    ),
    ToolSpec(
        "get_news_headlines",
        "Get recent news headlines on a topic.",
        (
            _p("topic", "str", "The news topic.", _pick(TOPICS)),
            _p(
                "country",
                "str, optional",
                "Two-letter country code.",
                _pick(["us", "gb", "in", "au", "ca"]),
                default="us",
                phrase=lambda v: f" for country code {v}",
            ),
            _p(
                "page_size",
                "int, optional",
                "Headlines per page.",
                _int(5, 50),
                default=10,
                phrase=lambda v: f" with {v} headlines per page",
            ),
        ),
        ("Show me news headlines about {topic}{opts}.", "What's new in {topic}{opts}?"),
    ),
)

CONNECTORS = ("Also, ", "Additionally, ", "And ", "Then ", "After that, ")
OPTIONAL_RATE = 0.4


def _call(rng: random.Random, tool: ToolSpec) -> tuple[dict, str]:
    """Sample one call to ``tool``: ``({"name", "arguments"}, sentence)``."""
    arguments: dict[str, Any] = {}
    fields: dict[str, str] = {}
    phrases: list[str] = []
    for param in tool.params:
        if param.optional:
            if rng.random() >= OPTIONAL_RATE:
                continue
            value = param.sample(rng)
            assert param.phrase is not None
            phrases.append(param.phrase(value))
        else:
            value = param.sample(rng)
            fields[param.name] = (param.show or _show)(value)
        arguments[param.name] = value
    sentence = rng.choice(tool.templates).format(**fields, opts="".join(phrases))
    return {"name": tool.name, "arguments": arguments}, sentence


def _record(rng: random.Random, record_id: int) -> dict:
    n_calls = rng.choices((1, 2, 3), weights=(55, 30, 15))[0]
    calls: list[dict] = []
    sentences: list[str] = []
    used: list[ToolSpec] = []
    for i in range(n_calls):
        if used and rng.random() < 0.3:
            tool = used[-1]  # the same tool again with other arguments, like xLAM's parallel calls
        else:
            tool = rng.choice(CATALOG)
        call, sentence = _call(rng, tool)
        calls.append(call)
        if i:
            sentence = rng.choice(CONNECTORS) + sentence[0].lower() + sentence[1:]
        sentences.append(sentence)
        if tool not in used:
            used.append(tool)
    others = [tool for tool in CATALOG if tool not in used]
    tools = used + rng.sample(others, rng.randint(0, 3))
    rng.shuffle(tools)
    return {
        "id": record_id,
        "query": " ".join(sentences),
        "tools": _json([tool.xlam() for tool in tools]),
        "answers": _json(calls),
    }


def iter_records(seed: int | str = 0) -> Iterator[dict]:
    """An endless, deterministic stream of synthetic xLAM records."""
    rng = random.Random(f"xlam-synthetic:{seed}")
    for record_id in itertools.count():
        yield _record(rng, record_id)


def generate_records(num: int, seed: int | str = 0) -> list[dict]:
    """The first ``num`` records of ``iter_records(seed)``."""
    return list(itertools.islice(iter_records(seed), num))


def to_jsonl(records: list[dict]) -> str:
    """Records as JSON lines, the format of the committed sample."""
    return "".join(_json(record) + "\n" for record in records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--seed", default="0")
    parser.add_argument("--out", required=True, help="output .jsonl path")
    args = parser.parse_args(argv)
    seed: int | str = int(args.seed) if args.seed.lstrip("-").isdigit() else args.seed
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(to_jsonl(generate_records(args.num, seed)))


if __name__ == "__main__":
    main()
