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

// What to tell a person whose login came back with ?bff_error=<code>. The code is bff's (an
// allow-listed OAuth error code or one of its own); anything else gets the generic sentence.
const LOGIN_ERRORS = {
  access_denied: 'The login was cancelled or refused. You are not logged in.',
  login_required: 'The provider needs you to log in again.',
  consent_required: 'The login needs your consent at the provider.',
  interaction_required: 'The login needs you to act at the provider.',
  temporarily_unavailable: 'The login service is busy. Try again in a moment.',
  provider_unavailable: 'The login service cannot be reached. Try again in a moment.',
  store_unavailable: 'Logins are unavailable for a moment. Try again shortly.',
  rate_limited: 'Too many login attempts from your network. Wait a moment and try again.',
  invalid_return_to: 'That link cannot be used to log in. Log in from here instead.',
};

/** Show why the last login failed (nothing when `code` is null). Text only: never markup. */
export function showLoginError(code) {
  const box = document.getElementById('login-error');
  if (code === null) {
    box.hidden = true;
    return;
  }
  const known = Object.hasOwn(LOGIN_ERRORS, code);
  const shown = /^[a-z_]{1,64}$/.test(code) ? ` (${code})` : '';
  box.textContent = known ? LOGIN_ERRORS[code] : `The login failed${shown}. Try again.`;
  box.dataset.code = known || shown ? code : 'login_failed';
  box.hidden = false;
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
