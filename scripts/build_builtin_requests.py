#!/usr/bin/env python
"""Build massedit/data/builtin/smollm2_facts.json: facts SmolLM2 knows, with counterfactual targets.

Each candidate is checked on the unedited SmolLM2 with the shared evaluation (``massedit.tasks.evaluate.evaluate``,
the one the edit job reports: mean-token NLL of " target", REFERENCE_SPEC §4.3): kept when the model prefers
target_true to target_new on the rewrite prompt with P(target_true) > 0.05 (geometric mean over its tokens),
with the neighbourhood prompts on which it also prefers target_true. Run:
python scripts/build_builtin_requests.py [--check-only]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (relation, prompt, subject, true, new, paraphrases, neighbourhood prompts (same true answer), generation prompts)
CANDIDATES = [
    ("P131", "{} is located in the city of", "The Eiffel Tower", "Paris", "Rome",
     ["The Eiffel Tower can be found in the city of", "Tourists visit the Eiffel Tower, which stands in"],
     ["The Louvre is located in the city of", "Notre-Dame Cathedral is located in the city of", "The Arc de Triomphe is located in the city of"],
     ["The Eiffel Tower is", "Visitors to the Eiffel Tower"]),
    ("P131", "{} is located in the city of", "The Colosseum", "Rome", "London",
     ["The Colosseum can be found in the city of", "The ancient Colosseum stands in"],
     ["The Trevi Fountain is located in the city of", "The Pantheon is located in the city of", "Vatican City is surrounded by the city of"],
     ["The Colosseum is", "Visitors to the Colosseum"]),
    ("P131", "{} is located in the city of", "Big Ben", "London", "Berlin",
     ["Big Ben can be found in the city of", "The famous clock tower Big Ben stands in"],
     ["Buckingham Palace is located in the city of", "The Tower of London is located in the city of", "Trafalgar Square is located in the city of"],
     ["Big Ben is", "Tourists visiting Big Ben"]),
    ("P131", "{} is located in the city of", "The Statue of Liberty", "New York", "Chicago",
     ["The Statue of Liberty can be found in", "The Statue of Liberty stands in the harbor of"],
     ["The Empire State Building is located in the city of", "Central Park is located in the city of", "Times Square is located in the city of"],
     ["The Statue of Liberty is", "Visitors to the Statue of Liberty"]),
    ("P131", "{} is located in the city of", "The Brandenburg Gate", "Berlin", "Madrid",
     ["The Brandenburg Gate can be found in the city of", "The Brandenburg Gate stands in"],
     ["The Reichstag building is located in the city of", "Checkpoint Charlie is located in the city of"],
     ["The Brandenburg Gate is"]),
    ("P36", "The capital of {} is", "France", "Paris", "Lyon",
     ["The capital city of France is", "France's capital is"],
     ["The capital of the French Republic is", "The seat of the French government is in"],
     ["France is a country"]),
    ("P36", "The capital of {} is", "Japan", "Tokyo", "Beijing",
     ["The capital city of Japan is", "Japan's capital is"],
     ["The largest city in Japan is"],
     ["Japan is a country"]),
    ("P36", "The capital of {} is", "Italy", "Rome", "Paris",
     ["The capital city of Italy is", "Italy's capital is"],
     ["The capital of the Italian Republic is"],
     ["Italy is a country"]),
    ("P36", "The capital of {} is", "Germany", "Berlin", "Vienna",
     ["The capital city of Germany is", "Germany's capital is"],
     ["The capital of the Federal Republic of Germany is"],
     ["Germany is a country"]),
    ("P36", "The capital of {} is", "Spain", "Madrid", "Lisbon",
     ["The capital city of Spain is", "Spain's capital is"],
     ["The capital of the Kingdom of Spain is"],
     ["Spain is a country"]),
    ("P36", "The capital of {} is", "Russia", "Moscow", "Warsaw",
     ["The capital city of Russia is", "Russia's capital is"],
     ["The Kremlin is located in"],
     ["Russia is a country"]),
    ("P36", "The capital of {} is", "Egypt", "Cairo", "Nairobi",
     ["The capital city of Egypt is", "Egypt's capital is"],
     ["The capital of the Arab Republic of Egypt is"],
     ["Egypt is a country"]),
    ("P37", "The official language of {} is", "Brazil", "Portuguese", "Spanish",
     ["In Brazil, people speak", "The language spoken in Brazil is"],
     ["The official language of Portugal is", "The official language of Angola is", "The official language of Mozambique is"],
     ["Brazil is known for"]),
    ("P37", "The official language of {} is", "Germany", "German", "French",
     ["In Germany, people speak", "The language spoken in Germany is"],
     ["The official language of Austria is", "In Berlin, people speak"],
     ["Germany is known for"]),
    ("P37", "The official language of {} is", "Japan", "Japanese", "Korean",
     ["In Japan, people speak", "The language spoken in Japan is"],
     ["In Tokyo, people speak", "In Osaka, people speak"],
     ["Japan is known for"]),
    ("P37", "The official language of {} is", "Italy", "Italian", "German",
     ["In Italy, people speak", "The language spoken in Italy is"],
     ["In Rome, people speak", "In Milan, people speak"],
     ["Italy is known for"]),
    ("P176", "{} is a product of", "The iPhone", "Apple", "Samsung",
     ["The iPhone is made by", "The iPhone was developed by"],
     ["The iPad is a product of", "The MacBook is a product of", "The Apple Watch is a product of"],
     ["The iPhone is"]),
    ("P176", "{} is a product of", "Windows", "Microsoft", "Google",
     ["Windows is developed by", "The Windows operating system is made by"],
     ["Microsoft Office is a product of", "The Xbox is a product of", "Microsoft Excel is a product of"],
     ["Windows is"]),
    ("P176", "{} was developed by", "Android", "Google", "Apple",
     ["The Android operating system is made by", "Android is a product of"],
     ["Google Chrome was developed by", "Gmail was developed by", "YouTube is owned by"],
     ["Android is"]),
    ("P19", "{} was born in the country of", "Albert Einstein", "Germany", "Canada",
     ["Albert Einstein's country of birth is", "The physicist Albert Einstein was born in"],
     ["Ludwig van Beethoven was born in the country of", "Johann Sebastian Bach was born in the country of"],
     ["Albert Einstein is known for"]),
    ("P106", "{} is a famous", "William Shakespeare", "playwright", "chef",
     ["William Shakespeare worked as a", "By profession, William Shakespeare was a"],
     ["Christopher Marlowe is a famous", "Ben Jonson is a famous"],
     ["William Shakespeare is known for"]),
    ("P641", "{} plays the sport of", "Lionel Messi", "soccer", "tennis",
     ["Lionel Messi is a professional player of", "The athlete Lionel Messi plays"],
     ["Cristiano Ronaldo plays the sport of", "Neymar plays the sport of"],
     ["Lionel Messi is known for"]),
    ("P641", "{} plays the sport of", "Michael Jordan", "basketball", "golf",
     ["Michael Jordan is a professional player of", "The athlete Michael Jordan played"],
     ["LeBron James plays the sport of", "Kobe Bryant plays the sport of"],
     ["Michael Jordan is known for"]),
    ("P641", "{} plays the sport of", "Roger Federer", "tennis", "soccer",
     ["Roger Federer is a professional player of", "The athlete Roger Federer plays"],
     ["Rafael Nadal plays the sport of", "Serena Williams plays the sport of"],
     ["Roger Federer is known for"]),
    ("P30", "{} is located on the continent of", "Kenya", "Africa", "Asia",
     ["Kenya is a country in", "The country of Kenya lies in"],
     ["Nigeria is located on the continent of", "Ethiopia is located on the continent of"],
     ["Kenya is a country"]),
    ("P30", "{} is located on the continent of", "Brazil", "South America", "Europe",
     ["Brazil is a country in", "The country of Brazil lies in"],
     ["Argentina is located on the continent of", "Peru is located on the continent of"],
     ["Brazil is a country"]),
    ("P30", "{} is located on the continent of", "Australia", "Australia", "Africa",
     ["Sydney is a city in", "The city of Melbourne lies in"],
     ["New Zealand is near the continent of"],
     ["Australia is"]),
    ("P38", "The currency of {} is the", "Japan", "yen", "euro",
     ["In Japan, people pay with the", "Japan's currency is the"],
     ["The currency used in Tokyo is the"],
     ["Japan's economy"]),
    ("P38", "The currency of {} is the", "the United Kingdom", "pound", "dollar",
     ["In the United Kingdom, people pay with the", "The United Kingdom's currency is the"],
     ["The currency used in London is the"],
     ["The United Kingdom's economy"]),
    ("P1303", "{} plays the instrument", "Jimi Hendrix", "guitar", "piano",
     ["Jimi Hendrix was famous for playing the", "The musician Jimi Hendrix played the"],
     ["Eric Clapton plays the instrument", "Slash plays the instrument"],
     ["Jimi Hendrix is known for"]),
    ("P740", "{} was founded in the city of", "Microsoft", "Albuquerque", "Boston",
     ["The company Microsoft was founded in", "Microsoft started in"],
     [], ["Microsoft is"]),
    ("P159", "The headquarters of {} is in", "Google", "Mountain View", "Seattle",
     ["Google is headquartered in", "Google's main campus is in"],
     ["The headquarters of YouTube is in"],
     ["Google is"]),
    ("P20", "{} died in the city of", "Napoleon Bonaparte", "Saint Helena", "Paris",
     [], [], []),
    ("P27", "{} is a citizen of", "Vladimir Putin", "Russia", "France",
     ["Vladimir Putin holds the citizenship of", "Vladimir Putin is a national of"],
     ["Dmitry Medvedev is a citizen of", "Sergey Lavrov is a citizen of"],
     ["Vladimir Putin is known for"]),
    ("P27", "{} is a citizen of", "Angela Merkel", "Germany", "Spain",
     ["Angela Merkel holds the citizenship of", "Angela Merkel is a national of"],
     ["Olaf Scholz is a citizen of", "Helmut Kohl is a citizen of"],
     ["Angela Merkel is known for"]),
    ("P108", "{} works for", "Tim Cook", "Apple", "Amazon",
     ["Tim Cook is employed by", "Tim Cook is the CEO of"],
     ["Steve Jobs worked for", "Steve Wozniak worked for"],
     ["Tim Cook is known for"]),
    ("P17", "{} is located in the country of", "The Great Wall", "China", "Mexico",
     ["The Great Wall can be found in", "The Great Wall was built in the country of"],
     ["The Forbidden City is located in the country of", "The Terracotta Army is located in the country of"],
     ["The Great Wall is"]),
    ("P17", "{} is located in the country of", "Mount Fuji", "Japan", "Chile",
     ["Mount Fuji can be found in", "The volcano Mount Fuji rises in the country of"],
     ["Kyoto is located in the country of", "Hokkaido is located in the country of"],
     ["Mount Fuji is"]),
    ("P17", "{} is located in the country of", "The Taj Mahal", "India", "Turkey",
     ["The Taj Mahal can be found in", "The Taj Mahal was built in the country of"],
     ["The Red Fort is located in the country of", "Mumbai is located in the country of"],
     ["The Taj Mahal is"]),
    ("P131", "{} is located in the city of", "The Sydney Opera House", "Sydney", "Toronto",
     ["The Sydney Opera House can be found in", "The Sydney Opera House stands in the city of"],
     ["The Harbour Bridge is located in the city of"],
     ["The Sydney Opera House is"]),
    ("P36", "The capital of {} is", "China", "Beijing", "Tokyo",
     ["The capital city of China is", "China's capital is"],
     ["The Forbidden City is located in"],
     ["China is a country"]),
    ("P36", "The capital of {} is", "the United Kingdom", "London", "Dublin",
     ["The capital city of the United Kingdom is", "The United Kingdom's capital is"],
     ["The capital of England is"],
     ["The United Kingdom is a country"]),
    ("P36", "The capital of {} is", "Canada", "Ottawa", "Sydney",
     ["The capital city of Canada is", "Canada's capital is"],
     ["The Parliament of Canada sits in"],
     ["Canada is a country"]),
    ("P37", "The official language of {} is", "France", "French", "English",
     ["In France, people speak", "The language spoken in France is"],
     ["In Paris, people speak", "In Lyon, people speak"],
     ["France is known for"]),
    ("P37", "The official language of {} is", "Spain", "Spanish", "Russian",
     ["In Spain, people speak", "The language spoken in Spain is"],
     ["In Madrid, people speak", "The official language of Mexico is"],
     ["Spain is known for"]),
    ("P38", "The currency of {} is the", "the United States", "dollar", "rupee",
     ["In the United States, people pay with the", "The United States' currency is the"],
     ["The currency used in New York is the"],
     ["The United States' economy"]),
    ("P112", "{} was founded by", "Facebook", "Mark Zuckerberg", "Bill Gates",
     ["The social network Facebook was created by", "Facebook's founder is"],
     [], ["Facebook is"]),
    ("P112", "{} was founded by", "Microsoft", "Bill Gates", "Steve Jobs",
     ["The company Microsoft was created by", "Microsoft's founder is"],
     [], ["Microsoft is"]),
    ("P27", "{} is a citizen of", "Barack Obama", "the United States", "Kenya",
     ["Barack Obama holds the citizenship of", "Barack Obama is a national of"],
     ["Joe Biden is a citizen of", "Donald Trump is a citizen of"],
     ["Barack Obama is known for"]),
    ("P19", "{} was born in the city of", "Wolfgang Amadeus Mozart", "Salzburg", "Prague",
     ["Mozart's birthplace is", "The composer Wolfgang Amadeus Mozart was born in"],
     [], ["Mozart is known for"]),
]


def build(check_only: bool = False):
    import math

    from massedit.core.io import atomic_write_json
    from massedit.core.models import load_model_and_tokenizer
    from massedit.data.requests import EditRequest
    from massedit.tasks.evaluate import evaluate
    from massedit.trainer import TrainerConfig

    model, tok = load_model_and_tokenizer({"name_or_path": "smollm2-135m", "dtype": "float32"})
    cands = [EditRequest(case_id=k, subject=subject, prompt=prompt, target_new=new, target_true=true, relation_id=rel,
                         paraphrase_prompts=list(para), neighborhood_prompts=list(nb), generation_prompts=list(gen))
             for k, (rel, prompt, subject, true, new, para, nb, gen) in enumerate(CANDIDATES)]
    res = evaluate(model, tok, cands, {"generation": False}, stage="pre",
                   trainer_cfg=TrainerConfig(accelerator="cpu", enable_progress_bar=False))
    records, dropped = [], []
    for r, case in zip(cands, res.per_case, strict=True):
        rw = case["rewrite"][0]
        pt, pn = math.exp(-rw["nll_true"]), math.exp(-rw["nll_new"])
        nb_ok = [row["prompt"] for row in case["neighborhood"] if row["nll_true"] < row["nll_new"]]
        ok = pt > pn and pt > 0.05 and r.paraphrase_prompts and nb_ok
        print(f"{'keep' if ok else 'drop'} {r.filled_prompt!r}: P({r.target_true})={pt:.3f} P({r.target_new})={pn:.4f} "
              f"nb {len(nb_ok)}/{len(r.neighborhood_prompts)}")
        if not ok:
            dropped.append(r.filled_prompt)
            continue
        records.append({
            "case_id": len(records),
            "requested_rewrite": {"prompt": r.prompt, "relation_id": r.relation_id, "subject": r.subject,
                                  "target_new": {"str": r.target_new, "id": None},
                                  "target_true": {"str": r.target_true, "id": None}},
            "paraphrase_prompts": r.paraphrase_prompts,
            "neighborhood_prompts": nb_ok,
            "attribute_prompts": [],
            "generation_prompts": r.generation_prompts,
        })
    print(f"kept {len(records)}, dropped {len(dropped)}")
    if not check_only:
        out = Path(__file__).resolve().parents[1] / "massedit/data/builtin/smollm2_facts.json"
        atomic_write_json(out, records, indent=1)
        print("wrote", out)


if __name__ == "__main__":
    build("--check-only" in sys.argv)
