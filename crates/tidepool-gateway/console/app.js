// The console's script: signs in through `api/session` (relative to this page).
const app = document.getElementById('app');
const response = await fetch('api/session', { credentials: 'same-origin' });
app.querySelector('p').textContent = response.ok ? 'Signed in.' : 'Not signed in.';
