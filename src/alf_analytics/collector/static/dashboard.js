/* alf-analytics dashboard: charts, local times, live refresh. No build step, no framework.
 *
 * The server renders every page (escaped by Jinja). This script never builds markup from
 * data: it reads chart columns from a JSON <script> element, sets text with textContent,
 * and in live mode re-fetches the page and swaps in the server's freshly rendered regions.
 */
(function () {
  "use strict";

  var LIVE_SECONDS = 5;
  var charts = [];

  function cssVar(name, fallback) {
    var value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return value || fallback;
  }

  function readChartData() {
    var node = document.getElementById("chart-data");
    if (!node) return null;
    try {
      return JSON.parse(node.textContent);
    } catch (err) {
      return null;
    }
  }

  function formatMs(value) {
    if (value == null) return "–";
    if (value === 0) return "0 ms";
    if (value < 10) return value.toFixed(2) + " ms";
    if (value < 1000) return value.toFixed(0) + " ms";
    return (value / 1000).toFixed(2) + " s";
  }

  // Axis ticks: one unit and one number of decimals for the whole axis, the fewest that
  // tell the ticks apart ("0 ms, 5 ms, 10 ms"; "0.0 ms, 2.5 ms, 5.0 ms"), never a mix.
  function tickDecimals(values) {
    for (var decimals = 0; decimals < 3; decimals++) {
      var scale = Math.pow(10, decimals);
      var exact = values.every(function (v) {
        return Math.abs(v * scale - Math.round(v * scale)) < 1e-6 * Math.max(1, Math.abs(v * scale));
      });
      if (exact) return decimals;
    }
    return 3;
  }

  function formatTicks(splits, unit) {
    var top = Math.max.apply(null, [0].concat(splits.map(Math.abs)));
    var scale = 1;
    var suffix = unit ? " " + unit : "";
    if (unit === "ms" && top >= 1000) {
      scale = 0.001;
      suffix = " s";
    } else if (unit === "ms" && top > 0 && top < 0.1) {
      scale = 1000; // "20 µs" reads better than "0.020 ms"
      suffix = " µs";
    }
    var values = splits.map(function (v) {
      return v * scale;
    });
    var decimals = tickDecimals(values);
    return values.map(function (v) {
      return v.toFixed(decimals) + suffix;
    });
  }

  function formatRate(value) {
    if (value == null) return "–";
    return value < 10 ? value.toFixed(2) : value.toFixed(0);
  }

  // Series are told apart by dash pattern and legend label as well as by colour.
  var CHARTS = {
    requests: {
      series: [
        { label: "All", key: "count", color: "--chart-all", dash: [], fill: true },
        { label: "4xx", key: "client_errors", color: "--chart-4xx", dash: [6, 4] },
        { label: "5xx", key: "server_errors", color: "--chart-5xx", dash: [2, 3] },
      ],
      value: formatRate,
      unit: "req/min",
      // A quiet range still gets a y axis up to 1 request per minute, not up to 0.02.
      floor: 1,
    },
    latency: {
      series: [
        { label: "p50", key: "p50", color: "--chart-p50", dash: [] },
        { label: "p95", key: "p95", color: "--chart-p95", dash: [6, 4] },
        { label: "p99", key: "p99", color: "--chart-p99", dash: [2, 3] },
      ],
      value: formatMs,
      unit: "ms",
      // Sub-millisecond latencies fill the chart too (its ticks carry their unit).
      floor: 0.001,
      noLabel: true,
    },
  };

  function lonePoints(values) {
    return function (u, seriesIdx) {
      for (var i = 0; i < values.length; i++) {
        if (values[i] != null && values[i - 1] == null && values[i + 1] == null) return true;
      }
      return values.length < 3;
    };
  }

  function chartWidth(node) {
    return Math.max(node.clientWidth, 240);
  }

  function drawCharts() {
    charts.forEach(function (chart) {
      chart.destroy();
    });
    charts = [];
    var data = readChartData();
    if (!data || !window.uPlot || !data.total || !data.columns.t.length) return;
    var columns = data.columns;
    var grid = cssVar("--grid", "#ddd");
    var text = cssVar("--muted", "#555");
    document.querySelectorAll("[data-chart]").forEach(function (node) {
      var spec = CHARTS[node.getAttribute("data-chart")];
      if (!spec) return;
      var series = [{}];
      var values = [columns.t];
      spec.series.forEach(function (s) {
        var color = cssVar(s.color, "#36c");
        series.push({
          label: s.label,
          stroke: color,
          width: 2,
          dash: s.dash,
          fill: s.fill ? color + "22" : undefined,
          spanGaps: false,
          // A lone value between gaps has no line to draw: a point shows it.
          points: { show: lonePoints(columns[s.key]), size: 5 },
          value: function (u, v) {
            return spec.value(v);
          },
        });
        values.push(columns[s.key]);
      });
      var axis = { stroke: text, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid } };
      var opts = {
        width: chartWidth(node),
        height: 220,
        series: series,
        scales: {
          // One bucket alone would make uPlot span years around it: show its window instead.
          x: {
            time: true,
            range: function (u, min, max) {
              return min === max && data.end ? [data.start, data.end] : [min, max];
            },
          },
          y: {
            range: function (u, min, max) {
              return [0, Math.max(max || 0, spec.floor) * 1.1];
            },
          },
        },
        axes: [
          axis,
          Object.assign({}, axis, {
            size: 60,
            label: spec.noLabel ? undefined : spec.unit,
            values: function (u, splits) {
              var labels = formatTicks(splits, spec.unit === "ms" ? "ms" : "");
              // The labels as drawn (on the canvas), for a reader of the page and its tests.
              node.setAttribute("data-y-ticks", labels.join("|"));
              return labels;
            },
          }),
        ],
        cursor: { drag: { x: false, y: false } },
        legend: { live: true },
      };
      while (node.firstChild) node.removeChild(node.firstChild);
      var chart = new window.uPlot(opts, values, node);
      chart.root.setAttribute("data-points", String(columns.t.length));
      charts.push(chart);
    });
  }

  function resizeCharts() {
    charts.forEach(function (chart) {
      var node = chart.root.parentNode;
      if (node) chart.setSize({ width: chartWidth(node), height: 220 });
    });
  }

  var pad = function (n) {
    return (n < 10 ? "0" : "") + n;
  };

  // <time datetime="...Z">UTC</time> -> the viewer's local time; the UTC value stays as a title.
  function localizeTimes(root) {
    var now = new Date();
    var today = now.getFullYear() + "-" + pad(now.getMonth() + 1) + "-" + pad(now.getDate());
    root.querySelectorAll("time[datetime]").forEach(function (node) {
      var value = node.getAttribute("datetime");
      if (!value) return;
      var date = new Date(value);
      if (isNaN(date.getTime())) return;
      var day = date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate());
      var clock = pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds());
      if (!node.title) node.title = node.textContent + " UTC";
      // Today's times show the clock only, in the viewer's time zone; older ones the date too.
      var full = node.hasAttribute("data-full") || day !== today;
      node.textContent = full ? day + " " + clock : clock;
    });
  }

  // Live mode (?live=1): fetch this same URL every few seconds and swap the live regions.
  var timer = null;
  var busy = false;
  var FOCUSABLE = "a[href], button, input, select, textarea, summary, [tabindex]";

  function liveEnabled() {
    return new URLSearchParams(location.search).get("live") === "1";
  }

  // What the Live button says: "on", "retrying" (the last poll failed: the collector is
  // restarting or cannot read its store; polling goes on) or "stopped" (logged out).
  function liveState(state, detail) {
    document.querySelectorAll("[data-live-toggle]").forEach(function (button) {
      button.setAttribute("data-live-state", state);
      button.textContent = "Live: " + state;
      button.title = detail || "";
    });
  }

  // The keyboard focus inside a region about to be replaced: which control it was on, so
  // the same control of the fresh region gets it back (replacing a region drops the focus
  // to the page's start, every 5 s, for anyone reading it with the keyboard).
  function focusOf(region) {
    var active = document.activeElement;
    if (!active || active === document.body || !region.contains(active)) return null;
    var all = Array.prototype.slice.call(region.querySelectorAll(FOCUSABLE));
    return { index: all.indexOf(active), href: active.getAttribute("href"), text: active.textContent };
  }

  function restoreFocus(region, focus) {
    if (!focus) return;
    var all = Array.prototype.slice.call(region.querySelectorAll(FOCUSABLE));
    var same = all.filter(function (node) {
      return node.getAttribute("href") === focus.href && node.textContent === focus.text;
    });
    var target = same[0] || all[Math.min(focus.index, all.length - 1)];
    if (target) target.focus({ preventScroll: true });
  }

  // How far each table box of a region is scrolled sideways: on a phone the log scrolls to
  // show its status column, and a refresh put it back to the left edge every 5 s.
  function scrollsOf(region) {
    return Array.prototype.map.call(region.querySelectorAll(".scroll"), function (box) {
      return box.scrollLeft;
    });
  }

  function restoreScrolls(region, scrolled) {
    Array.prototype.forEach.call(region.querySelectorAll(".scroll"), function (box, i) {
      if (scrolled[i]) box.scrollLeft = scrolled[i];
    });
  }

  // The service and environment selectors follow the store too (a new service shows up
  // without a reload), unless the viewer is choosing in one.
  function refreshChoices(fresh) {
    document.querySelectorAll("form.scope select").forEach(function (select) {
      if (select === document.activeElement || !select.name) return;
      var other = fresh.querySelector("form.scope select[name=" + select.name + "]");
      if (!other) return;
      var values = function (node) {
        return Array.prototype.map.call(node.options, function (o) {
          return o.value + "\u0000" + o.text;
        }).join("\u0001");
      };
      if (values(select) === values(other)) return;
      var value = select.value;
      while (select.firstChild) select.removeChild(select.firstChild);
      Array.prototype.forEach.call(other.childNodes, function (node) {
        select.appendChild(document.importNode(node, true));
      });
      select.value = value;
    });
  }

  function refresh() {
    if (busy || document.hidden || !timer) return;
    busy = true;
    fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (response.redirected && new URL(response.url).pathname === "/login") {
          // Logged out (or the read key changed): nothing to poll until a new login.
          stopLive();
          liveState("stopped", "Logged out: reload the page to log in again.");
          return null;
        }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        if (html == null) return;
        var fresh = new DOMParser().parseFromString(html, "text/html");
        if (!document.querySelector("[data-live-region]") && fresh.querySelector("[data-live-region]")) {
          // This page is the 503 one (the store was away when it loaded: no figures to swap)
          // and the store answers again: load the page itself.
          location.reload();
          return;
        }
        document.querySelectorAll("[data-live-region]").forEach(function (region) {
          if (region.hasAttribute("data-live-frozen") || !region.id) return;
          var replacement = fresh.getElementById(region.id);
          if (!replacement) return;
          var focus = focusOf(region);
          var scrolled = scrollsOf(region);
          var node = document.importNode(replacement, true);
          region.replaceWith(node);
          restoreScrolls(node, scrolled);
          restoreFocus(node, focus);
        });
        refreshChoices(fresh);
        localizeTimes(document);
        drawCharts();
        liveState("on");
        document.documentElement.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function (err) {
        // The collector restarting, or a 503 while it cannot read its store: keep the
        // figures shown, say so, and try again on the next tick.
        var when = new Date();
        var clock = pad(when.getHours()) + ":" + pad(when.getMinutes()) + ":" + pad(when.getSeconds());
        liveState("retrying", "The refresh at " + clock + " failed (" + err.message + "); retrying every " + LIVE_SECONDS + " s.");
      })
      .then(function () {
        busy = false;
      });
  }

  function stopLive() {
    if (timer) clearInterval(timer);
    timer = null;
  }

  function setupLive() {
    var on = liveEnabled();
    document.querySelectorAll("[data-live-toggle]").forEach(function (button) {
      button.hidden = false;
      button.setAttribute("aria-pressed", on ? "true" : "false");
      button.textContent = on ? "Live: on" : "Live: off";
      button.addEventListener("click", function () {
        var url = new URL(location.href);
        if (on) url.searchParams.delete("live");
        else url.searchParams.set("live", "1");
        location.assign(url.toString());
      });
    });
    if (!on) return;
    timer = setInterval(refresh, LIVE_SECONDS * 1000);
    // Back on a tab hidden for a while: fresh figures at once, not up to 5 s later.
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) refresh();
    });
  }

  // <input type=datetime-local data-utc>: the server speaks UTC, the viewer their own time.
  function toInput(date) {
    return (
      date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate()) + "T" +
      pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds())
    );
  }

  function setupTimeInputs() {
    document.querySelectorAll("input[data-utc]").forEach(function (input) {
      if (input.value) {
        var date = new Date(input.value + "Z");
        if (!isNaN(date.getTime())) input.value = toInput(date);
      }
      var label = input.parentNode.querySelector("[data-tz-label]");
      if (label) label.textContent = "(local time)";
    });
  }

  // A form of the pages, sent as a link to share: the filled fields only (no "path=&route="),
  // local From/To times as the UTC instants they are, and, when a range is chosen while the
  // Range selector reads "Custom", without From and To (a range counts back from now).
  function formQuery(form) {
    var range = form.querySelector("select[data-range][data-custom]");
    var dropTimes = Boolean(range && range.value);
    var params = new URLSearchParams();
    Array.prototype.forEach.call(form.elements, function (field) {
      if (!field.name || field.disabled || !field.value) return;
      if (field.type === "submit" || field.type === "button") return;
      if (dropTimes && (field.name === "since" || field.name === "until")) return;
      var value = field.value;
      if (field.hasAttribute("data-utc")) {
        var local = new Date(value);
        if (!isNaN(local.getTime())) value = local.toISOString().slice(0, 19);
      }
      params.append(field.name, value);
    });
    return params.toString();
  }

  function send(form) {
    var query = formQuery(form);
    location.assign(form.getAttribute("action") + (query ? "?" + query : ""));
  }

  // Choosing a service, environment or range applies it at once: picked with the mouse or
  // a touch screen, on the change; with the keyboard (arrows, Home/End, typing its first
  // letters step through the choices and each one is a change), on Enter or on leaving the
  // selector, so the arrows browse the choices instead of loading a page per step. After a
  // choice made with the keyboard the selector has the focus again on the new page.
  var STEP_KEYS = /^(ArrowUp|ArrowDown|ArrowLeft|ArrowRight|Home|End|PageUp|PageDown|.)$/;
  var REFOCUS = "alf-refocus";

  function setupAutosubmit() {
    document.querySelectorAll("form[data-autosubmit]").forEach(function (form) {
      form.querySelectorAll("select").forEach(function (select) {
        var initial = select.value;
        var stepping = false;
        var apply = function (byKeyboard) {
          if (select.value === initial) return;
          initial = select.value;
          if (byKeyboard) {
            try {
              sessionStorage.setItem(REFOCUS, select.name);
            } catch (err) {
              /* no session storage: the focus starts at the page's top */
            }
          }
          send(form);
        };
        select.addEventListener("keydown", function (event) {
          if (event.key === "Enter") {
            event.preventDefault();
            apply(true);
          } else if (!event.altKey && !event.ctrlKey && !event.metaKey && event.key !== " " && STEP_KEYS.test(event.key)) {
            stepping = true;
          }
        });
        select.addEventListener("mousedown", function () {
          stepping = false;
        });
        select.addEventListener("change", function () {
          if (!stepping) apply(false);
        });
        select.addEventListener("blur", function () {
          if (stepping) apply(true);
          stepping = false;
        });
      });
    });
    var again = null;
    try {
      again = sessionStorage.getItem(REFOCUS);
      sessionStorage.removeItem(REFOCUS);
    } catch (err) {
      again = null;
    }
    if (again) {
      var select = document.querySelector("form[data-autosubmit] select[name=" + again + "]");
      if (select) select.focus();
    }
  }

  function setupForms() {
    document.querySelectorAll("main form[method=get]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        event.preventDefault();
        send(form);
      });
    });
  }

  // "← Requests" on a detail page goes back to the filtered log it was opened from.
  function setupBack() {
    document.querySelectorAll("a[data-back]").forEach(function (link) {
      var from = document.referrer ? new URL(document.referrer) : null;
      if (from && from.origin === location.origin && from.pathname === "/requests") {
        link.href = from.pathname + from.search;
      }
    });
  }

  // On a phone the log's filters fold away unless one is active.
  function setupCollapse() {
    if (!window.matchMedia("(max-width: 640px)").matches) return;
    document.querySelectorAll("details[data-collapse-narrow]").forEach(function (box) {
      if (!box.hasAttribute("data-active")) box.open = false;
    });
  }

  function start() {
    setupCollapse();
    setupTimeInputs();
    setupBack();
    localizeTimes(document);
    drawCharts();
    setupLive();
    setupForms();
    setupAutosubmit();
    var pending = null;
    window.addEventListener("resize", function () {
      clearTimeout(pending);
      pending = setTimeout(resizeCharts, 100);
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
