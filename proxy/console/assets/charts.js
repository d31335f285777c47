// Draws every [data-chart] element of a console page with uPlot, from the JSON
// data block next to it ({ series: [labels], data: [[x...], [y...], ...] }).
"use strict";
(function () {
  const colors = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c"];
  for (const el of document.querySelectorAll("[data-chart]")) {
    const source = document.getElementById(el.dataset.chart + "-data");
    if (!source) continue;
    const { series, data } = JSON.parse(source.textContent);
    const opts = {
      width: Math.max(320, el.clientWidth || 640),
      height: 200,
      scales: { x: { time: true } },
      series: [{}].concat(series.map((label, i) => ({
        label,
        stroke: colors[i % colors.length],
        width: 2,
        points: { show: data[0].length < 40 },
      }))),
    };
    // eslint-disable-next-line no-undef
    new uPlot(opts, data, el);
  }
})();
