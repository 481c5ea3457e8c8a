// DOM plumbing for app.js: nothing here talks to bff.

const SECTIONS = ['loading', 'logged-out', 'logged-in'];

/** Show one of the page's states, optionally with a message for the logged-out one. */
export function show(id, message) {
  for (const section of SECTIONS) document.getElementById(section).hidden = section !== id;
  if (message !== undefined) document.getElementById('logged-out-message').textContent = message;
  if (id !== 'logged-in') {
    stopCountdown();
    document.getElementById('claims').textContent = '';
  }
}

export function showClaims(user) {
  const claims = user.claims ?? {};
  document.getElementById('user-name').textContent = claims.name ?? claims.email ?? user.sub;
  document.getElementById('claims').textContent = JSON.stringify({ sub: user.sub, ...claims }, null, 2);
}

export function showApiPending(call) {
  setApiStatus(`Call #${call}: waiting for the answer…`, false);
}

export function showApiAnswer(call, status, body) {
  const time = new Date().toLocaleTimeString();
  const note = body?.token_fingerprint
    ? ` Access token fingerprint ${body.token_fingerprint}: it changes when bff refreshes the token.`
    : '';
  setApiStatus(`Call #${call}: ${status} at ${time}.${note}`, false);
  document.getElementById('api-result').textContent = JSON.stringify(body, null, 2);
}

export function showApiError(call, status, message) {
  setApiStatus(`Call #${call}: ${status ? `${status} ${message}` : message}`, true);
  document.getElementById('api-result').textContent = '';
}

function setApiStatus(text, isError) {
  const status = document.getElementById('api-status');
  status.textContent = text;
  status.classList.toggle('error', isError);
}

let timer = null;

/** Tick down to the session's end; when it is reached, `onExpired` asks bff again. */
export function startCountdown(user, onExpired) {
  stopCountdown();
  const tick = () => {
    const now = Date.now() / 1000;
    const absolute = user.expires_at - now;
    const idle = (user.idle_expires_at ?? user.expires_at) - now;
    document.getElementById('remaining').textContent = duration(Math.min(absolute, idle));
    document.getElementById('idle-remaining').textContent = duration(idle);
    if (Math.min(absolute, idle) <= 0) {
      stopCountdown();
      onExpired();
    }
  };
  tick();
  timer = setInterval(tick, 1000);
}

function stopCountdown() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}

function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const parts = h ? [`${h}h`, `${m}m`] : m ? [`${m}m`, `${s % 60}s`] : [`${s % 60}s`];
  return parts.join(' ');
}
