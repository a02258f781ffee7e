from django import template

register = template.Library()


@register.filter
def duration(seconds) -> str:
    """12 s, 1 min 40 s, 25 min, 2 h 10 min, 3 d 4 h: as precise as a person reading a dashboard wants."""
    try:
        s = round(float(seconds))
    except (TypeError, ValueError):
        return ""
    if s < 60:
        return f"{s} s"
    if s < 600:  # "1 min 40 s": a short job's minutes alone would round away half of it
        m, sec = divmod(s, 60)
        return f"{m} min {sec} s" if sec else f"{m} min"
    if s < 3600:
        return f"{round(s / 60)} min"
    if s < 86400:
        h, m = divmod(round(s / 60), 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(round(s / 3600), 24)
    return f"{d} d {h} h" if h else f"{d} d"
