"""The Streamlit script ``adaptwin dashboard`` runs: page navigation and the shared sidebar.

Run it through the CLI (``adaptwin dashboard``), which exports the lake, broker and refresh period; plain
``streamlit run`` works too and then reads $ADAPTWIN_LAKE / $ADAPTWIN_BOOTSTRAP like every command.
"""

from __future__ import annotations

import streamlit as st

from adaptwin.dashboard import (page_adapters, page_compare, page_live, page_pipeline, page_query,
                                page_recommendations, settings)

PAGES = [  # (render, title, url path, icon)
    (page_live.render, "Live", "live", ":material/monitoring:"),
    (page_adapters.render, "Adapters", "adapters", ":material/grid_view:"),
    (page_recommendations.render, "Recommendations", "recommendations", ":material/recommend:"),
    (page_compare.render, "Twin vs real", "twin-vs-real", ":material/compare_arrows:"),
    (page_query.render, "Query", "query", ":material/database:"),
    (page_pipeline.render, "Pipeline", "pipeline", ":material/conversion_path:"),
]


def main() -> None:
    st.set_page_config(page_title="adaptwin", page_icon=":material/hub:", layout="wide")
    s = settings.current()
    nav = st.navigation([st.Page(fn, title=title, url_path=path, icon=icon, default=(i == 0))
                         for i, (fn, title, path, icon) in enumerate(PAGES)])
    with st.sidebar:
        st.markdown("**adaptwin** — multi-LoRA serving")
        live = st.toggle(f"Auto-refresh every {s.refresh_s:g} s", value=s.run_every is not None,
                         disabled=s.run_every is None, key="auto_refresh")
        st.session_state["refresh_every"] = s.run_every if live else None
        st.caption(f"lake `{s.lake}`  \nbroker `{s.bootstrap}`")
    nav.run()


main()
