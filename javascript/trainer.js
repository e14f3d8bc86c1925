// sd-webui-trainer: the Trainer tab's client side. Names are prefixed sd_trainer_ (all extensions share one page).

// While a run is followed, the job panel (status, loss curve, newest samples) is refreshed by clicking the tab's
// "Job status" button at most every SD_TRAINER_REFRESH_MS, and once more when the run ends.
var SD_TRAINER_REFRESH_MS = 3000;
var sd_trainer_last_refresh = 0;

function sd_trainer_refresh_job(force) {
    var now = Date.now();
    if (!force && now - sd_trainer_last_refresh < SD_TRAINER_REFRESH_MS) return;
    sd_trainer_last_refresh = now;
    var button = gradioApp().getElementById('sd_trainer_refresh');
    if (button) button.click();
}

// _js of the Train and Resume buttons: put a fresh task id in the first input (a hidden textbox) and follow the
// task with the WebUI's progress bar (requestProgress, javascript/progressbar.js) above the output area; the
// progress text (step, epoch, loss) also goes to #sd_trainer_progress, and the job panel refreshes live.
function sd_trainer_start() {
    var app = gradioApp();
    var id = randomId();
    var progressText = app.querySelector('#sd_trainer_progress');
    requestProgress(id, app.getElementById('sd_trainer_output'), null, function() {
        if (progressText) progressText.innerHTML = '';
        sd_trainer_refresh_job(true);
    }, function(progress) {
        if (progressText) progressText.textContent = progress.textinfo || '';
        sd_trainer_refresh_job(false);
    });
    var args = Array.from(arguments);
    args[0] = id;
    return args;
}
